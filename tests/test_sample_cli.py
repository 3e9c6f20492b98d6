"""`gptjax.load` and `python -m gptjax.sample` on a real (tiny) run, trained on an 8-device mesh."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import gptjax
from gptjax import config as C
from gptjax import sample, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run trained for a few steps on a mesh of 8 CPU devices (the tests load it on one)."""
    root = tmp_path_factory.mktemp("sample_run")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    (root / "corpus").mkdir()
    for d in range(30):
        text = "".join(f"def f{d}_{i}({rng.choice(words)}):\n    return {rng.choice(words)} + {i}\n" for i in range(20))
        (root / "corpus" / f"doc{d:02d}.txt").write_text(text)
    c = C.base_config()
    c.data.source = f"files:{root}/corpus/*.txt"
    c.data.val_fraction = 0.1
    c.tokenizer.vocab_size = 300
    c.model.update(n_layer=2, n_head=4, n_embd=32, block_size=64)
    c.train.update(steps=20, batch_size=8, seq_len=64, eval_every=20, eval_batches=1, log_every=10, checkpoint_every=10)
    c.optim.update(lr=3e-3, warmup_steps=2)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    path = str(root / "run")
    train.run(c, path, devices=jax.devices())
    return path


def test_load_workdir_and_checkpoint_generate(workdir):
    model = gptjax.load(workdir)
    assert model.model_config.n_layer == 2 and model.tokenizer.vocab_size == model.model_config.vocab_size
    leaf = jax.tree_util.tree_leaves(model.params)[0]
    assert len(leaf.sharding.device_set) == 1
    texts = model.generate(["def ", "return"], max_new_tokens=20, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert model.generate(["def ", "return"], max_new_tokens=20, temperature=0.8, top_k=20, top_p=0.9, seed=1) == texts
    ids = model.generate_tokens([model.tokenizer.encode("def ")], max_new_tokens=10, temperature=0)
    assert model.generate("def ", max_new_tokens=10, temperature=0) == [model.tokenizer.decode(ids[0])]
    step10 = gptjax.load(os.path.join(workdir, "checkpoints", "10"))
    assert step10.generate("def ", max_new_tokens=5, temperature=0)[0] is not None


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_prints_samples_and_speed(workdir, capsys, tmp_path):
    args = ["--workdir", workdir, "--prompt", "def ", "--num_samples", "3", "--max_new_tokens", "30",
            "--temperature", "0.8", "--top_k", "50", "--top_p", "0.95", "--seed", "0"]
    sample.main(args)
    out = capsys.readouterr()
    assert out.out.count("---------- sample") == 3
    assert "tokens/s" in out.err
    sample.main(args)
    assert capsys.readouterr().out == out.out  # same seed, same text
    (tmp_path / "p.txt").write_text("def f1_2(alpha):\n")
    sample.main(["--workdir", workdir, "--prompt_file", str(tmp_path / "p.txt"), "--max_new_tokens", "10", "--temperature", "0"])
    single = capsys.readouterr().out
    assert single.startswith("def f1_2(alpha):\n")
    model = gptjax.load(workdir)
    assert single.rstrip("\n") == "def f1_2(alpha):\n" + model.generate("def f1_2(alpha):\n", max_new_tokens=10, temperature=0)[0]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top_k", "-1"], "top_k"),
        (["--top_k", "100000"], "top_k"),
        (["--top_p", "0"], "top_p"),
        (["--top_p", "1.5"], "top_p"),
        (["--max_new_tokens", "0"], "max_new_tokens"),
        (["--num_samples", "0"], "num_samples"),
        (["--prompt", "x " * 200, "--max_new_tokens", "10"], "truncate"),
        (["--prompt_file", "/nonexistent/prompt.txt"], "prompt_file"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(workdir, capsys, extra, message):
    code, out, err = run_cli(["--workdir", workdir, "--max_new_tokens", "5", *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cli_truncate_prompt_cuts_from_the_left(workdir, capsys):
    sample.main(["--workdir", workdir, "--prompt", "x " * 200, "--max_new_tokens", "10", "--truncate_prompt", "--temperature", "0"])
    assert "tokens/s" in capsys.readouterr().err


def test_cli_refuses_a_path_that_is_not_a_run(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "gptjax.sample", "--workdir", str(tmp_path), "--prompt", "x"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not a gptjax run" in r.stderr
