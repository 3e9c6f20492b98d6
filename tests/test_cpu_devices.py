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

from gptjax import checkpoint_read
from gptjax import config as C
from gptjax import sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MESH = C.MeshConfig()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    for d in range(30):
        lines = [f"def f{d}_{i}({rng.choice(words)}):\n    return {rng.choice(words)} + {i}\n" for i in range(20)]
        (path / f"doc{d:02d}.txt").write_text("".join(lines))
    return str(path / "*.txt")


def tiny_config(corpus, **train_overrides):
    c = C.base_config()
    c.data.source = f"files:{corpus}"
    c.tokenizer.vocab_size = 300
    c.model.update(n_layer=2, n_head=4, n_embd=32, block_size=32)
    c.train.update(steps=8, batch_size=8, seq_len=32, eval_batches=0, log_every=1, checkpoint_every=4)
    c.train.update(**train_overrides)
    c.optim.update(lr=3e-3, warmup_steps=2)
    return c


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


def _cli(tmp_path, corpus, *args, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's shell
    env.update(env_extra)
    cmd = [sys.executable, "-m", "gptjax.train", "--workdir", str(tmp_path / "run"), f"--config.data.source=files:{corpus}",
           "--config.tokenizer.vocab_size=300", "--config.model.n_layer=1", "--config.model.n_embd=32",
           "--config.model.block_size=32", "--config.train.seq_len=32", "--config.train.eval_batches=0",
           "--config.optim.warmup_steps=0", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr.splitlines()


needs_cores = pytest.mark.skipif(sharding.cpu_cores() < 2, reason="one core: one device, nothing to arrange")


@needs_cores
def test_cli_trains_data_parallel_over_one_device_per_core(corpus, tmp_path):
    n = sharding.cpu_cores()
    err = _cli(tmp_path, corpus, "--config.train.steps=2", f"--config.train.batch_size={2 * n}")
    assert err[0] == f"CPU: {n} devices, one per core, data parallel"
    model_line = next(line for line in err if line.startswith("model:"))
    assert f"mesh {{'data': {n}, 'fsdp': 1, 'tensor': 1}} on {n} cpu device(s)" in model_line


@needs_cores
def test_cli_falls_back_to_fewer_devices_that_divide_the_batch(corpus, tmp_path):
    n = sharding.cpu_cores()
    prime = next(p for p in range(n + 1, 4 * n + 4) if all(p % d for d in range(2, p)))  # no count in 2..n divides it
    err = _cli(tmp_path, corpus, "--dry_run", f"--config.train.batch_size={prime}")
    assert err[0] == (f"CPU: {n} cores; data parallel over 1 device (the micro-batch of {prime} sequences "
                      f"does not divide by {n})")


@pytest.mark.parametrize(
    "args, env",
    [
        (["--config.mesh.data=1"], {}),  # an explicit mesh: one device, as before
        ([], {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}),
        ([], {"JAX_NUM_CPU_DEVICES": "1"}),
    ],
    ids=["mesh", "xla_flags", "jax_num_cpu_devices"],
)
def test_cli_leaves_a_chosen_mesh_or_device_count_alone(corpus, tmp_path, args, env):
    err = _cli(tmp_path, corpus, "--config.train.steps=1", *args, **env)
    assert not any(line.startswith("CPU:") for line in err), err
    model_line = next(line for line in err if line.startswith("model:"))
    assert "on 1 cpu device(s)" in model_line


# -- resume across a change of device count ---------------------------------------------------


def test_a_one_device_run_resumes_on_two_devices(corpus, tmp_path):
    """Steps 1-4 on one device, 5-8 data parallel on two, against uninterrupted runs on one and
    on two devices. Steps 1-4 are the one-device run's bit for bit; the later ones agree with
    both runs to fp32 rounding: two devices sum each half-batch's gradient and then add the
    halves, one device sums the whole batch in another order. On two devices throughout, a
    resumed run is the uninterrupted one bit for bit."""
    one, two, resumed, two_resumed = (str(tmp_path / n) for n in ("one", "two", "resumed", "two_resumed"))
    devices = jax.devices()
    train.run(tiny_config(corpus), one, devices=devices[:1])
    for workdir in (two, resumed, two_resumed):
        os.makedirs(workdir)
        shutil.copytree(os.path.join(one, "tokenizer"), os.path.join(workdir, "tokenizer"))
    train.run(tiny_config(corpus), two, devices=devices[:2])
    assert train.run(tiny_config(corpus), resumed, devices=devices[:1], stop_at=4)["step"] == 4
    assert train.run(tiny_config(corpus), resumed, devices=devices[:2])["step"] == 8
    train.run(tiny_config(corpus), two_resumed, devices=devices[:2], stop_at=4)
    train.run(tiny_config(corpus), two_resumed, devices=devices[:2])

    a, b, r = losses(one), losses(two), losses(resumed)
    assert sorted(a) == sorted(b) == sorted(r) == list(range(1, 9))
    assert losses(two_resumed) == b
    assert [r[s] for s in range(1, 5)] == [a[s] for s in range(1, 5)]  # the same program on one device
    np.testing.assert_allclose([r[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=0, atol=2e-5)
    np.testing.assert_allclose([r[s] for s in range(5, 9)], [b[s] for s in range(5, 9)], rtol=0, atol=2e-5)
    _, final_one = checkpoint_read.load_for_inference(one)
    _, final_resumed = checkpoint_read.load_for_inference(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(final_one), jax.tree_util.tree_leaves(final_resumed)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-5)
