"""`python -m gptjax.plot`: runs' curves against steps and tokens, in a PNG."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("matplotlib")

from gptjax import plot  # noqa: E402


def test_plot_writes_a_png_of_every_run_and_metric(trained_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    with open(other / "metrics.jsonl", "w") as f:  # a run with a benchmark task and no config.json
        for step in (5, 10):
            f.write(json.dumps({"step": step, "loss": 3.0 / step}) + "\n")
            f.write(json.dumps({"step": step, "val_loss": 4.0 / step, "val_bpb": 1.0 / step}) + "\n")
            f.write(json.dumps({"step": step, "eval/hs/acc": 0.25, "eval/hs/items": 6.0}) + "\n")
    out = tmp_path / "curves.png"
    plot.main([trained_run.workdir, str(other), "-o", str(out)])
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    runs = [plot.read_run(trained_run.workdir)[0], plot.read_run(str(other))[0]]
    assert plot.panels(runs) == [["loss", "val_loss"], ["val_bpb"], ["eval/hs/acc"]]
    assert plot.read_run(trained_run.workdir)[1] == 8 * 32  # tokens per step, from config.json
    assert plot.series(runs[1], "val_bpb") == ([5, 10], [0.2, 0.1])


def test_a_directory_without_metrics_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "has no metrics.jsonl" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.png")
