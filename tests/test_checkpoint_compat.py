"""A run directory written by older code (commit f2bc3f8, kept in tests/fixtures/run_f2bc3f8)
still loads for inference, resumes, and continues the same run."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from fixtures.make_old_run import small_config

import gptjax
from gptjax import checkpoint as ckpt
from gptjax import train
from gptjax.checkpoint_read import read_run_config
from gptjax.layout import RunDir

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_f2bc3f8")


def _flat(params) -> dict:
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _expected(step: int) -> dict:
    with np.load(os.path.join(FIXTURE, f"params_{step}.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture
def old_run(tmp_path):
    """A copy of the fixture (the run and its corpus), so that tests may write to it."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    return str(tmp_path / "old")


def _assert_params_equal(params, expected) -> None:
    flat = _flat(params)
    assert sorted(flat) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(flat[k], expected[k], err_msg=k)


def test_old_checkpoints_load_for_inference(old_run):
    workdir = os.path.join(old_run, "run")
    with open(os.path.join(workdir, "checkpoints", "2", "data", "metadata")) as f:
        assert set(json.load(f)) == {"step", "seed", "batches_drawn"}  # the old data item
    run_dir = RunDir.at(workdir)
    config = read_run_config(run_dir)
    assert config.model.n_embd == 16 and config.model.vocab_size == 300
    _assert_params_equal(ckpt.restore_params(run_dir, None), _expected(4))  # orbax
    _assert_params_equal(ckpt.restore_params(run_dir, 2), _expected(2))
    model = gptjax.load(workdir)  # the direct read
    _assert_params_equal(model.params, _expected(4))
    out = model.generate_tokens([[5, 6, 7]], max_new_tokens=4, temperature=0.0)
    assert len(out[0]) == 4


def test_old_run_resumes_and_continues_the_same_run(old_run, capsys):
    workdir = os.path.join(old_run, "run")
    old = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    old_loss = {m["step"]: m["loss"] for m in old if "loss" in m}
    shutil.rmtree(RunDir.at(workdir).checkpoint(4))  # resume from step 2, as if killed after it
    config = small_config(os.path.join(old_run, "corpus", "*.txt"))
    final = train.run(config, workdir, devices=jax.devices()[:1])
    assert "resuming from step 2" in capsys.readouterr().out
    assert final["step"] == 4
    new = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [m["step"] for m in new if "loss" in m] == [1, 2, 3, 4]  # steps 3-4 once: the old ones dropped
    new_loss = {m["step"]: m["loss"] for m in new if "loss" in m}
    np.testing.assert_allclose([new_loss[s] for s in (3, 4)], [old_loss[s] for s in (3, 4)], rtol=1e-5)
    params = ckpt.restore_params(RunDir.at(workdir), None)
    expected, flat = _expected(4), _flat(params)
    for k in expected:
        np.testing.assert_allclose(flat[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    with open(os.path.join(workdir, "checkpoints", "4", "data", "metadata")) as f:
        assert json.load(f) == {"step": 4, "skipped_steps": 0}  # the data item as it is written now
