"""End-to-end training: learning, 1 vs 8 devices, exact resume, and bad input at the CLI.

The reference runs are the shared `trained_run` (tests/conftest.py: 20 steps on one device);
the runs compared with it start from its tokenizer and use its config, stopping early where
the first steps are enough (the learning-rate schedule is the 20-step run's)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import checkpoint_read
from gptjax import config as C
from gptjax import optim as optim_lib
from gptjax import sharding, step, train
from gptjax.state import param_shapes
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.model import GPTConfig
from gptjax.sampling import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir, key="loss"):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if key in m:
                out[m["step"]] = m[key]
    return out


def test_loss_falls_and_run_dir_is_complete(trained_run, tmp_path):
    """A run of its own from nothing (the tokenizer too), long enough to learn."""
    workdir = str(tmp_path / "run")
    c = trained_run.config(steps=60, eval_every=30, checkpoint_every=30)
    final = train.run(c, workdir, devices=jax.devices()[:1])
    losses = read_metrics(workdir)
    assert losses[60] < 0.6 * losses[1]
    assert final["val_loss"] < 0.6 * np.log(300)
    assert os.path.isfile(os.path.join(workdir, "config.json"))
    assert os.path.isdir(os.path.join(workdir, "tokenizer"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["30", "60"]
    assert any(name.startswith("events") for name in os.listdir(os.path.join(workdir, "tb")))
    saved = C.from_json(open(os.path.join(workdir, "config.json")).read())
    assert saved.model.vocab_size == 300  # resolved from the tokenizer


def test_one_device_and_eight_device_mesh_give_the_same_losses(trained_run, trained_mesh_run):
    """The shared one-device run and the same run on a mesh of 8 (`trained_mesh_run`: data,
    fsdp and tensor 2 each): the same loss at every step and the same evaluations."""
    assert len(jax.devices()) == 8
    assert C.from_json(open(os.path.join(trained_mesh_run, "config.json")).read()).mesh.to_dict() == dict(data=2, fsdp=2, tensor=2)
    a, b = read_metrics(trained_run.workdir), read_metrics(trained_mesh_run)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], atol=1e-4, rtol=0)
    va, vb = read_metrics(trained_run.workdir, "val_loss"), read_metrics(trained_mesh_run, "val_loss")
    assert sorted(va) == sorted(vb) == [10, 20]
    np.testing.assert_allclose([va[s] for s in vb], [vb[s] for s in vb], atol=1e-4, rtol=0)


def test_gradient_accumulation_matches_one_big_batch(trained_run, tmp_path):
    """The first 3 steps of the shared run (one batch of 8 a step), in 4 micro-batches of 2."""
    acc = trained_run.tokenizer_only(tmp_path / "acc")
    train.run(trained_run.config(grad_accum=4), acc, devices=jax.devices()[:1], stop_at=3)
    a, b = read_metrics(trained_run.workdir), read_metrics(acc)
    assert sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], atol=1e-5, rtol=0)


def test_bf16_compute_trains_on_cpu_and_tracks_fp32(trained_run, tmp_path):
    """model.dtype=bfloat16 (fp32 params, bf16 matmuls) runs its train step, eval and sampling
    on XLA's CPU runtime, on 1 and on 8 devices, and stays close to the fp32 run (the shared
    run's first 10 steps; the bf16 runs stop there, after its evaluation and checkpoint)."""
    fp32 = trained_run.workdir
    bf16, bf16_mesh = (trained_run.tokenizer_only(tmp_path / n) for n in ("bf16", "bf16_mesh"))
    c = trained_run.config()
    c.model.dtype = "bfloat16"
    final = train.run(c, bf16, devices=jax.devices()[:1], stop_at=10)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    train.run(c, bf16_mesh, stop_at=10)
    a, b, m = read_metrics(fp32), read_metrics(bf16), read_metrics(bf16_mesh)
    assert sorted(a)[:10] == sorted(b) == sorted(m) == list(range(1, 11))
    np.testing.assert_allclose([b[s] for s in b], [a[s] for s in b], atol=0.05, rtol=0)
    np.testing.assert_allclose([m[s] for s in b], [b[s] for s in b], atol=0.02, rtol=0)
    assert b[10] < 0.9 * b[1] and np.isfinite(final["val_loss"])
    model = load(bf16)
    assert model.config.model.dtype == "bfloat16"
    out = model.generate_tokens([[5, 6, 7]], max_new_tokens=4, temperature=0.0)
    assert len(out[0]) == 4


def test_resume_continues_the_same_run(trained_run, tmp_path):
    """Stopped at step 10 and run again, against the shared run (the same config, straight through)."""
    straight = trained_run.workdir
    resumed = trained_run.tokenizer_only(tmp_path / "resumed")
    first = train.run(trained_run.config(), resumed, devices=jax.devices()[:1], stop_at=10)
    assert first["step"] == 10
    assert RunDir.at(resumed).steps() == [10]
    second = train.run(trained_run.config(), resumed, devices=jax.devices()[:1])
    assert second["step"] == 20
    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])
    _, pa = checkpoint_read.load_for_inference(straight)
    _, pb = checkpoint_read.load_for_inference(resumed)
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.train.stepz=3"], "unknown config field 'train.stepz'"),
        (["--config.train.steps=many"], "train.steps expects a int"),
        (["--config.model.n_head=5"], "must divide model.n_embd"),
        (["--config.mesh.data=3"], "their product must equal the device count"),
        (["--config.train.batch_size=6", "--config.mesh.data=4", "--config.mesh.fsdp=2"], "divisible by the data-parallel size"),
        (["--config.data.source=files:/nonexistent/*.txt"], "matches no files"),
        (["--config.init_from=gpt2"], "init_from must be '' or 'hf:/path/to/hf-dir'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(overrides, message, trained_run, tmp_path, capsys):
    workdir = tmp_path / "w"
    base = [f"--config.data.source=files:{trained_run.corpus}", "--config.tokenizer.vocab_size=300"]
    code, err = _cli(["--workdir", str(workdir), *base, *overrides], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not workdir.exists()


def test_dry_run_refuses_what_the_run_would(trained_run, tmp_path, capsys):
    workdir = tmp_path / "w"
    code, err = _cli(["--workdir", str(workdir), "--dry_run", f"--config.data.source=files:{trained_run.corpus}",
                      "--config.eval.tasks=bpb:nonsense"], capsys)
    assert code == 2 and len(err) == 1 and "eval.tasks 'bpb:nonsense': unknown source kind 'nonsense'" in err[0], err
    assert not workdir.exists()


def test_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    workdir = tmp_path / "w"
    code, err = _cli(["--workdir", str(workdir), f"--config.data.source=files:{tmp_path}/empty.txt"], capsys)
    assert code == 2 and err[-1].startswith("error: ") and "no text" in err[-1], err  # after what preparation said
    assert not workdir.exists()


def test_workdir_of_another_model_shape_is_refused_untouched(trained_run, tmp_path, capsys):
    workdir = trained_run.copy(tmp_path / "run")
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
    c = trained_run.config(steps=40)  # a run that would continue past its last checkpoint
    c.model.n_embd = 64
    with pytest.raises(UserError, match="different model shape"):
        train.run(c, workdir, devices=jax.devices()[:1])
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
    assert before == after


def test_cli_subprocess_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gptjax.train", "--workdir", str(tmp_path / "w"), "--config.model.n_head=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "n_head=3" in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def cpu_step_temps():
    """Temporary bytes of the trainer's CPU train step for one batch of 8 x 256 tokens of a
    2-layer model: as the trainer compiles it ("ours"), the same program under XLA's default CPU
    scheduler ("default"), and with model.remat ("remat"). Two layers and long rows: the
    activations that remat and the scheduler act on are most of the step's memory, as in the
    deeper model, and each program compiles once for both tests below."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    batch = {k: jax.ShapeDtypeStruct((1, 8, 256), d) for k, d in dtypes.items()}
    temp = {}
    for remat in (False, True):
        gpt = GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=256, remat=remat)
        optimizer = optim_lib.make_optimizer(C.sections(C.base_config()).optim, param_shapes(gpt), 100)
        steps = step.build_steps(gpt, optimizer, mesh, seed=0)
        with steps.layout.context():
            lowered = steps.train_jit.lower(steps.layout.abstract_state, batch)
            temp["remat" if remat else "ours"] = lowered.compile().memory_analysis().temp_size_in_bytes
            if not remat:
                options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}
                temp["default"] = lowered.compile(options).memory_analysis().temp_size_in_bytes
    return temp


def test_the_cpu_train_step_compiles_with_the_memory_optimized_scheduler(cpu_step_temps):
    """Without remat too, the trainer's CPU step holds less temporary memory than the same step
    under XLA's default CPU scheduler (it would not, were the option dropped)."""
    assert cpu_step_temps["ours"] < 0.9 * cpu_step_temps["default"], cpu_step_temps


def test_remat_on_cpu_compiles_a_smaller_train_step(cpu_step_temps):
    """model.remat lowers the train step's temporary memory on XLA's CPU runtime (the CPU step
    compiles with the memory-optimized scheduler, without which remat saved nothing here)."""
    assert cpu_step_temps["remat"] < 0.8 * cpu_step_temps["ours"], cpu_step_temps
