"""The resolved run: resolve() reads the config and writes nothing, the vocabulary rule, the
abstract train step for a mesh without data, and the default workdir per config."""

import os
import shlex

import jax
import pytest
from fixtures.make_old_run import small_config, write_corpus

from gptjax import config as C
from gptjax import layout, sample, sharding, train
from gptjax.errors import UserError
from gptjax.prepare import prepare
from gptjax.run import resolve
from gptjax.run_model import model_config


def test_model_config_is_where_vocab_size_0_means_the_tokenizers():
    base = C.base_config().model.to_dict()
    assert base["vocab_size"] == 0
    assert model_config(base, 300).vocab_size == 300
    assert model_config({**base, "vocab_size": 512}, 300).vocab_size == 512
    with pytest.raises(UserError, match="smaller than the tokenizer's vocabulary"):
        model_config({**base, "vocab_size": 100}, 300)
    imported = {"vocab_size": 700, "n_layer": 2, "n_head": 4, "n_embd": 64, "n_mlp": 0, "block_size": 128, "ln_eps": 1e-5}
    gpt = model_config(base, None, imported)
    assert (gpt.vocab_size, gpt.n_embd, gpt.dtype) == (700, 64, base["dtype"])


def test_resolve_writes_nothing_and_leaves_the_config_alone(tmp_path):
    config = small_config(write_corpus(str(tmp_path / "corpus")))
    before = config.to_dict()
    workdir = tmp_path / "run"
    run = resolve(config, str(workdir), devices=jax.devices()[:1])
    assert not workdir.exists() and config.to_dict() == before
    assert run.model.vocab_size == 300 and run.config.model.vocab_size == 300
    assert run.tokenizer is None and run.dataset is None
    prepared = prepare(run)
    assert prepared.tokenizer.vocab_size == 300 and prepared.model is run.model
    assert workdir.is_dir() and config.to_dict() == before
    with pytest.raises(Exception):
        run.config.model.vocab_size = 1  # the resolved config is frozen


def test_a_changed_optimizer_rule_is_refused_before_any_checkpoint_is_touched(trained_run, tmp_path):
    """Resuming with a rule that changes the optimizer state's structure (layer_decay, freeze)
    is one UserError naming the field, raised before anything is written: the checkpoints stay
    where they are (not set aside as unreadable) and config.json keeps the saved settings. A
    change that keeps the structure (the learning rate) resumes. (A copy of the shared run,
    set to continue past its last checkpoint.)"""
    config = trained_run.config(steps=40)
    workdir = trained_run.copy(tmp_path / "run")
    run_dir = layout.RunDir.at(workdir)
    saved, steps = open(run_dir.config).read(), sorted(os.listdir(run_dir.checkpoints))
    for field, value in (("layer_decay", 0.5), ("freeze", "wpe/*")):
        changed = config.copy_and_resolve_references()
        changed.optim[field] = value
        with pytest.raises(UserError, match=rf"optimizer state has another structure.*'{field}'"):
            train.run(changed, workdir, devices=jax.devices()[:1])
        assert sorted(os.listdir(run_dir.checkpoints)) == steps and open(run_dir.config).read() == saved
        assert not os.path.exists(os.path.join(workdir, "unreadable"))
    faster = config.copy_and_resolve_references()
    faster.optim.lr = 1e-3
    assert resolve(faster, workdir, devices=jax.devices()[:1]).resuming


def test_abstract_train_and_eval_steps_lower_for_a_mesh_without_data():
    config = C.base_config()
    config.model.update(n_layer=1, n_head=2, n_embd=16, block_size=16)
    config.tokenizer.vocab_size = 300  # stands in for vocab_size 0: no tokenizer is read or trained
    config.train.update(batch_size=8, seq_len=16, grad_accum=2)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    run = resolve(config, None, devices=jax.devices()[:8])
    assert run.model.vocab_size == 300
    state = run.steps.layout.abstract_state
    assert state.params["wte"]["embedding"].sharding.spec == run.steps.layout.params["wte"]["embedding"].spec
    compiled = run.steps.lower_train_step(8, 16).compile()
    assert compiled.memory_analysis() is not None
    run.steps.lower_eval_step(8, 16).compile()


def _write_config(path, corpus: str, steps: int) -> str:
    path.write_text(
        "from gptjax.config import base_config\n\n\ndef get_config():\n"
        "    c = base_config()\n"
        f"    c.data.source = 'files:{corpus}'\n"
        "    c.data.val_fraction = 0.2\n"
        "    c.tokenizer.vocab_size = 300\n"
        "    c.model.update(n_layer=1, n_head=2, n_embd=16, block_size=16)\n"
        f"    c.train.update(steps={steps}, batch_size=8, seq_len=16, eval_every=2, eval_batches=1, log_every=1,"
        " checkpoint_every=2, peak_tflops=1.0)\n"  # MFU against a given peak: no matmul timed at each start
        "    c.optim.update(warmup_steps=1)\n"
        "    return c\n"
    )
    return str(path)


def test_default_workdir_is_per_config_and_a_second_run_resumes(tmp_path, monkeypatch, capsys):
    """Three CLI runs in this process (on one device: the devices are not what is tested here,
    and the tests' 8 simulated CPU devices would make each step an 8-way program)."""
    monkeypatch.setattr(sharding, "default_devices", lambda mesh, micro_batch: (jax.devices()[:1], ""))
    corpus = write_corpus(str(tmp_path / "corpus"))
    alpha = _write_config(tmp_path / "alpha.py", corpus, steps=2)
    beta = _write_config(tmp_path / "beta.py", corpus, steps=2)
    assert layout.default_workdir(None) == os.path.join("runs", "default")
    monkeypatch.chdir(tmp_path)
    train.main(["--config", alpha])
    out = capsys.readouterr().out
    assert "workdir runs/alpha: a new run" in out
    train.main(["--config", beta])
    assert "workdir runs/beta: a new run" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "runs")) == ["alpha", "beta"]
    train.main(["--config", alpha, "--config.train.steps=4"])
    out = capsys.readouterr().out
    assert "workdir runs/alpha: resuming from step 2" in out
    assert layout.RunDir.at(tmp_path / "runs" / "alpha").steps()[-1] == 4
    # The last line says how to sample; it runs as printed.
    line = out.strip().splitlines()[-1]
    assert line.startswith("sample:")
    argv = shlex.split(line.split(":", 1)[1])
    assert argv[:3] == ["python", "-m", "gptjax.sample"] and argv[argv.index("--workdir") + 1] == "runs/alpha"
    argv += ["--max_new_tokens", "16"]  # shorter than printed (tests/test_readme.py runs it in full)
    sample.main(argv[3:])  # `python -m gptjax.sample` is sample.main, here in this process (in tmp_path)
    assert capsys.readouterr().out.strip()
