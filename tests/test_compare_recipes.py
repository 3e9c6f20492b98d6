"""tools/compare_recipes.py: reading the two runs' curves (training time without the compilation,
the first evaluation at or below the target), the refusal of recipes of different shapes, and a
smoke run of the modern recipe against the shared tiny GPT-2 run with the table, plot and summary."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shape of the shared `trained_run` (tests/conftest.py), 10 steps instead of its 20.
MODERN_AT_THE_TRAINED_RUNS_SHAPE = [
    "--devices", "1", "--config.model.n_layer=2", "--config.model.n_head=4", "--config.model.n_embd=32",
    "--config.model.block_size=32", "--config.train.batch_size=8", "--config.train.seq_len=32",
    "--config.train.steps=10", "--config.optim.warmup_steps=1",
    "--modern.train.peak_tflops=1"]  # MFU against a given peak: no matmul timed at the start


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_recipes", os.path.join(REPO, "tools", "compare_recipes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_metrics(workdir, rows):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_curves_leave_out_the_compilation_and_find_the_first_evaluation_at_the_target(tool, tmp_path):
    config = tool.config_lib.base_config()
    config.train.update(batch_size=2, seq_len=5)  # 10 tokens per step
    # Windows of 10 steps: the first took 100 s (compilation), the others 1 s and 3 s.
    _write_metrics(tmp_path / "gpt2", [
        {"step": 10, "loss": 4.0, "tokens_per_s": 1.0}, {"step": 10, "val_loss": 3.0},
        {"step": 20, "loss": 3.0, "tokens_per_s": 100.0}, {"step": 20, "val_loss": 2.0},
        {"step": 30, "loss": 2.0, "tokens_per_s": 100 / 3}, {"step": 30, "val_loss": 1.5},
    ])
    _write_metrics(tmp_path / "modern", [
        {"step": 10, "loss": 3.0, "tokens_per_s": 100.0}, {"step": 10, "val_loss": 1.6},
        {"step": 20, "loss": 2.0, "tokens_per_s": 100.0}, {"step": 20, "val_loss": 1.5},
        {"step": 30, "loss": 1.0, "tokens_per_s": 100.0}, {"step": 30, "val_loss": 1.2},
        {"step": 40, "loss": 1.0, "tokens_per_s": 2.0}, {"step": 40, "val_loss": 1.1},  # resumed: compiled again
    ])
    curves = {name: tool.curve(str(tmp_path / name), config) for name in ("gpt2", "modern")}
    g = curves["gpt2"]
    assert g["step_s"] == pytest.approx(0.3)  # the median of 0.1 and 0.3 s per step (upper middle)
    assert g["train_s"] == pytest.approx([3.0, 4.0, 7.0])  # the first window counted at the median
    assert g["compile_s"] == pytest.approx(97.0)
    m = curves["modern"]
    assert m["train_s"] == pytest.approx([1.0, 2.0, 3.0, 4.0]) and m["compile_s"] == pytest.approx(49.0)
    result = tool.compare(curves)
    assert result["target_val_loss"] == 1.5 and result["modern_steps_to_target"] == 20  # 1.5 <= 1.5, not 1.6
    assert result["step_ratio"] == pytest.approx(20 / 30) and result["time_ratio"] == pytest.approx(2.0 / 7.0)
    assert not result["meets_target"]  # 0.67 of the steps is more than half
    assert "0.67 of the steps, 0.29 of the training time" in tool.table(curves, result)


def test_recipes_of_different_shapes_are_refused_in_one_line(tool, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--workdir", str(tmp_path), "--modern.model.n_layer=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "the recipes differ in model.n_layer (4 and 3)" in err and len(err.splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_the_tool_trains_the_modern_recipe_against_a_gpt2_run_and_writes_table_plot_summary(tool, trained_run,
                                                                                            tmp_path, capsys):
    """Against the shared tiny GPT-2 run (`--gpt2_run`): only the modern recipe trains, at its shape."""
    root = tmp_path / "runs"
    argv = ["--gpt2_run", trained_run.workdir, "--workdir", str(root), *MODERN_AT_THE_TRAINED_RUNS_SHAPE]
    result = tool.main(argv)
    out = capsys.readouterr().out
    assert "== reusing the finished gpt2 run" in out and "== training the modern recipe" in out
    assert "| gpt2   | 20 " in out and "| modern | 10 " in out and "target: the gpt2 recipe's final val_loss" in out
    with open(root / "loss_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(root / "summary.json"))
    assert summary["curves"]["gpt2"]["steps"] == [10, 20] and summary["curves"]["modern"]["steps"] == [10]
    assert summary["result"]["target_val_loss"] == summary["curves"]["gpt2"]["val_loss"][-1] == result["target_val_loss"]
    # The modern run used the GPT-2 run's tokenizer and data, and Muon.
    assert open(os.path.join(trained_run.workdir, "tokenizer", "tokenizer.model"), "rb").read() == \
        open(root / "modern" / "tokenizer" / "tokenizer.model", "rb").read()
    saved = json.load(open(root / "modern" / "config.json"))
    assert saved["optim"]["hidden"] == "muon" and saved["data"]["source"] == f"files:{trained_run.corpus}"
    # A second call reuses the finished modern run.
    tool.main(argv)
    assert "== reusing the finished modern run" in capsys.readouterr().out
