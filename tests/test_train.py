"""End-to-end training: learning, 1 vs 8 devices, exact resume, and bad input at the CLI."""

import json
import os
import shutil
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
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.model import GPTConfig
from gptjax.sampling import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(path):
    """A small corpus with structure to learn: repetitive, program-like text."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    docs = []
    for d in range(40):
        lines = [f"def f{d}_{i}({rng.choice(words)}):\n    return {rng.choice(words)} + {i}\n" for i in range(20)]
        docs.append("".join(lines))
    path.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (path / f"doc{i:02d}.txt").write_text(doc)
    return str(path / "*.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config(corpus, **train_overrides):
    c = C.base_config()
    c.data.source = f"files:{corpus}"
    c.data.val_fraction = 0.1
    c.tokenizer.vocab_size = 300
    c.model.update(n_layer=2, n_head=4, n_embd=32, block_size=32)
    c.train.update(steps=20, batch_size=8, seq_len=32, eval_every=10, eval_batches=2, log_every=1, checkpoint_every=10)
    c.optim.update(lr=3e-3, warmup_steps=2)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.train.update(**train_overrides)
    return c


def read_metrics(workdir, key="loss"):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if key in m:
                out[m["step"]] = m[key]
    return out


def test_loss_falls_and_run_dir_is_complete(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    c = tiny_config(corpus, steps=60, eval_every=30, checkpoint_every=30)
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


def test_one_device_and_eight_device_mesh_give_the_same_losses(corpus, tmp_path):
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    train.run(tiny_config(corpus, steps=5), one, devices=jax.devices()[:1])
    os.makedirs(eight)
    shutil.copytree(os.path.join(one, "tokenizer"), os.path.join(eight, "tokenizer"))
    c = tiny_config(corpus, steps=5)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    assert len(jax.devices()) == 8
    train.run(c, eight)
    a, b = read_metrics(one), read_metrics(eight)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], atol=1e-4, rtol=0)


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    big, acc = str(tmp_path / "big"), str(tmp_path / "acc")
    train.run(tiny_config(corpus, steps=3), big, devices=jax.devices()[:1])
    os.makedirs(acc)
    shutil.copytree(os.path.join(big, "tokenizer"), os.path.join(acc, "tokenizer"))
    train.run(tiny_config(corpus, steps=3, grad_accum=4), acc, devices=jax.devices()[:1])
    a, b = read_metrics(big), read_metrics(acc)
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], atol=1e-5, rtol=0)


def test_bf16_compute_trains_on_cpu_and_tracks_fp32(corpus, tmp_path):
    """model.dtype=bfloat16 (fp32 params, bf16 matmuls) runs its train step, eval and sampling
    on XLA's CPU runtime, on 1 and on 8 devices, and stays close to the fp32 run."""
    fp32, bf16, bf16_mesh = (str(tmp_path / n) for n in ("fp32", "bf16", "bf16_mesh"))
    train.run(tiny_config(corpus, steps=10), fp32, devices=jax.devices()[:1])
    for workdir in (bf16, bf16_mesh):
        os.makedirs(workdir)
        shutil.copytree(os.path.join(fp32, "tokenizer"), os.path.join(workdir, "tokenizer"))
    c = tiny_config(corpus, steps=10)
    c.model.dtype = "bfloat16"
    final = train.run(c, bf16, devices=jax.devices()[:1])
    c.mesh.update(data=2, fsdp=2, tensor=2)
    train.run(c, bf16_mesh)
    a, b, m = read_metrics(fp32), read_metrics(bf16), read_metrics(bf16_mesh)
    assert sorted(a) == sorted(b) == sorted(m) == list(range(1, 11))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], atol=0.05, rtol=0)
    np.testing.assert_allclose([m[s] for s in a], [b[s] for s in a], atol=0.02, rtol=0)
    assert b[10] < 0.9 * b[1] and np.isfinite(final["val_loss"])
    model = load(bf16)
    assert model.config.model.dtype == "bfloat16"
    out = model.generate_tokens([[5, 6, 7]], max_new_tokens=4, temperature=0.0)
    assert len(out[0]) == 4


def test_resume_continues_the_same_run(corpus, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.run(tiny_config(corpus), straight, devices=jax.devices()[:1])
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "tokenizer"), os.path.join(resumed, "tokenizer"))
    first = train.run(tiny_config(corpus), resumed, devices=jax.devices()[:1], stop_at=10)
    assert first["step"] == 10
    assert RunDir.at(resumed).steps() == [10]
    second = train.run(tiny_config(corpus), resumed, devices=jax.devices()[:1])
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
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(overrides, message, corpus, tmp_path, capsys):
    workdir = tmp_path / "w"
    base = [f"--config.data.source=files:{corpus}", "--config.tokenizer.vocab_size=300"]
    code, err = _cli(["--workdir", str(workdir), *base, *overrides], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not workdir.exists()


def test_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    workdir = tmp_path / "w"
    code, err = _cli(["--workdir", str(workdir), f"--config.data.source=files:{tmp_path}/empty.txt"], capsys)
    assert code == 2 and err[-1].startswith("error: ") and "no text" in err[-1], err  # after what preparation said
    assert not workdir.exists()


def test_workdir_of_another_model_shape_is_refused_untouched(corpus, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train.run(tiny_config(corpus, steps=2, checkpoint_every=2), workdir, devices=jax.devices()[:1])
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
    c = tiny_config(corpus, steps=4)
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


def test_the_cpu_train_step_compiles_with_the_memory_optimized_scheduler():
    """Without remat too, the trainer's CPU step holds less temporary memory than the same step
    under XLA's default CPU scheduler (it would not, were the option dropped)."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch = {k: jax.ShapeDtypeStruct((1, 16, 128), d) for k, d in
             {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}.items()}
    gpt = GPTConfig(vocab_size=256, n_layer=4, n_head=4, n_embd=64, block_size=128)
    trainer = step.Trainer(gpt, optim_lib.make_optimizer(C.base_config().optim, step.param_shapes(gpt), 100), mesh, seed=0)
    with trainer.context():
        lowered = trainer.train_step_fn.lower(trainer.abstract_state(), batch)
        ours = lowered.compile().memory_analysis().temp_size_in_bytes
        default = lowered.compile({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}).memory_analysis().temp_size_in_bytes
    assert ours < 0.9 * default, (ours, default)


def test_remat_on_cpu_compiles_a_smaller_train_step():
    """model.remat lowers the train step's temporary memory on XLA's CPU runtime (the CPU step
    compiles with the memory-optimized scheduler, without which remat saved nothing here)."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    batch = {k: jax.ShapeDtypeStruct((1, 16, 128), d) for k, d in dtypes.items()}
    temp = {}
    for remat in (False, True):
        gpt = GPTConfig(vocab_size=256, n_layer=6, n_head=4, n_embd=64, block_size=128, remat=remat)
        optimizer = optim_lib.make_optimizer(C.base_config().optim, step.param_shapes(gpt), 100)
        trainer = step.Trainer(gpt, optimizer, mesh, seed=0)
        with trainer.context():
            compiled = trainer.train_step_fn.lower(trainer.abstract_state(), batch).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.8 * temp[False], temp
