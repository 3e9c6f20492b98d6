"""One CPU device per core by default (`sharding.arrange_cpu_devices`, `sharding.default_devices`):
which devices a run gets, the line that says so, and exact resume across a change of device count."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

from gptjax import checkpoint_read
from gptjax import config as C
from gptjax import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MESH = C.MeshConfig()


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f) if "loss" in m}


# -- which devices ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "micro_batch, used, note",
    [
        (12, 4, "CPU: 4 devices, one per core, data parallel"),
        (6, 3, "CPU: 4 cores; data parallel over 3 devices (the micro-batch of 6 sequences does not divide by 4)"),
        (5, 1, "CPU: 4 cores; data parallel over 1 device (the micro-batch of 5 sequences does not divide by 4)"),
    ],
)
def test_arranged_devices_are_the_most_that_divide_the_micro_batch(monkeypatch, micro_batch, used, note):
    monkeypatch.setattr(sharding, "_arranged_cpu_devices", 4)  # as arrange_cpu_devices leaves it on 4 cores
    devices, line = sharding.default_devices(DEFAULT_MESH, micro_batch)
    assert devices == jax.devices()[:used]
    assert line == note


def test_without_arranging_or_with_a_mesh_every_device_is_used(monkeypatch):
    assert sharding.default_devices(DEFAULT_MESH, 5) == (jax.devices(), "")  # the tests' 8 devices, as given
    monkeypatch.setattr(sharding, "_arranged_cpu_devices", 4)
    assert sharding.default_devices(C.MeshConfig(data=2, fsdp=2, tensor=2), 8) == (jax.devices(), "")


def test_arranging_leaves_a_chosen_count_a_mesh_and_a_started_backend_alone(monkeypatch):
    jax.devices()  # the backends have started
    assert sharding.arrange_cpu_devices(DEFAULT_MESH) is None  # XLA_FLAGS names a count (conftest)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert sharding.arrange_cpu_devices(C.MeshConfig(data=1, fsdp=1, tensor=1)) is None
    assert sharding.arrange_cpu_devices(DEFAULT_MESH) is None  # too late: the count is fixed
    assert jax.config.jax_num_cpu_devices == -1 and sharding._arranged_cpu_devices is None


# -- the CLI ----------------------------------------------------------------------------------


def _cli(trained_run, tmp_path, *args, **env_extra):
    """`python -m gptjax.train` on the shared run's corpus, from its tokenizer, as from a user's
    shell: no device count in XLA_FLAGS (only the suite's fast compiles: XLA's HLO passes all run)."""
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    env.update(env_extra)
    workdir = trained_run.tokenizer_only(tmp_path / "run")
    cmd = [sys.executable, "-m", "gptjax.train", "--workdir", workdir, f"--config.data.source=files:{trained_run.corpus}",
           "--config.tokenizer.vocab_size=300", "--config.model.n_layer=1", "--config.model.n_embd=32",
           "--config.model.block_size=32", "--config.train.seq_len=32", "--config.train.eval_batches=0",
           "--config.optim.warmup_steps=0", "--config.train.peak_tflops=1", *args]  # MFU against a given peak: no matmul timed
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr.splitlines(), r.stdout.splitlines()


needs_cores = pytest.mark.skipif(sharding.cpu_cores() < 2, reason="one core: one device, nothing to arrange")


@needs_cores
def test_cli_trains_data_parallel_over_one_device_per_core(trained_run, tmp_path):
    n = sharding.cpu_cores()
    err, _ = _cli(trained_run, tmp_path, "--config.train.steps=1", f"--config.train.batch_size={2 * n}")
    assert err[0] == f"CPU: {n} devices, one per core, data parallel"
    model_line = next(line for line in err if line.startswith("model:"))
    assert f"mesh {{'data': {n}, 'fsdp': 1, 'tensor': 1}} on {n} cpu device(s)" in model_line


@needs_cores
def test_cli_falls_back_to_fewer_devices_that_divide_the_batch(trained_run, tmp_path):
    n = sharding.cpu_cores()
    prime = next(p for p in range(n + 1, 4 * n + 4) if all(p % d for d in range(2, p)))  # no count in 2..n divides it
    err, out = _cli(trained_run, tmp_path, "--dry_run", f"--config.train.batch_size={prime}")
    assert err[0] == (f"CPU: {n} cores; data parallel over 1 device (the micro-batch of {prime} sequences "
                      f"does not divide by {n})")
    assert "mesh:      {'data': 1, 'fsdp': 1, 'tensor': 1} on 1 cpu device(s)" in out


@pytest.mark.parametrize(
    "args, env",
    [
        (["--config.mesh.data=1"], {}),  # an explicit mesh: one device, as before
        ([], {"XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}),
        ([], {"JAX_NUM_CPU_DEVICES": "1"}),
    ],
    ids=["mesh", "xla_flags", "jax_num_cpu_devices"],
)
def test_cli_leaves_a_chosen_mesh_or_device_count_alone(trained_run, tmp_path, args, env):
    err, out = _cli(trained_run, tmp_path, "--dry_run", *args, **env)  # the devices are chosen when the run resolves
    assert not any(line.startswith("CPU:") for line in err), err
    assert "mesh:      {'data': 1, 'fsdp': 1, 'tensor': 1} on 1 cpu device(s)" in out, out


# -- resume across a change of device count ---------------------------------------------------


def test_a_one_device_run_resumes_on_two_devices(trained_run, tmp_path):
    """The shared one-device run (`trained_run`: 20 steps) resumed from its checkpoint 10 on two
    devices, data parallel, against it and against uninterrupted runs on two devices. Steps
    11-20 agree with both runs to fp32 rounding: two devices sum each half-batch's gradient and
    then add the halves, one device sums the whole batch in another order. On two devices
    throughout, a run resumed from the uninterrupted one's checkpoint 10 is that run bit for bit."""
    one = trained_run.workdir
    resumed = trained_run.copy(tmp_path / "resumed")
    shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))  # as if stopped after checkpoint 10
    two = trained_run.tokenizer_only(tmp_path / "two")
    devices = jax.devices()
    config = trained_run.config(peak_tflops=1.0)  # MFU against a given peak: no matmul timed at each start
    assert train.run(config, resumed, devices=devices[:2])["step"] == 20
    train.run(config, two, devices=devices[:2])
    two_resumed = shutil.copytree(two, tmp_path / "two_resumed")
    shutil.rmtree(os.path.join(two_resumed, "checkpoints", "20"))
    assert train.run(config, two_resumed, devices=devices[:2])["step"] == 20

    a, b, r = losses(one), losses(two), losses(resumed)
    assert sorted(a) == sorted(b) == sorted(r) == list(range(1, 21))
    assert losses(two_resumed) == b
    assert [r[s] for s in range(1, 11)] == [a[s] for s in range(1, 11)]  # kept from before the resume
    np.testing.assert_allclose([r[s] for s in range(11, 21)], [a[s] for s in range(11, 21)], rtol=0, atol=2e-5)
    np.testing.assert_allclose([r[s] for s in range(11, 21)], [b[s] for s in range(11, 21)], rtol=0, atol=2e-5)
    _, final_one = checkpoint_read.load_for_inference(one)
    _, final_resumed = checkpoint_read.load_for_inference(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(final_one), jax.tree_util.tree_leaves(final_resumed)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-5)
