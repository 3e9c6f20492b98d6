"""tools/bench_gpu.py's smoke run: its tiny shape on the CPU prints the train and decode lines,
with ratios against the peak and bandwidth given on the command line."""

from __future__ import annotations

import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_tiny_smoke_run(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "tools", "bench_gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--peak_tflops=1", "--hbm_gbps=100", "--new=4"])
    out = capsys.readouterr().out
    assert "attention auto" in out
    assert re.search(r"train: [\d.]+ ms/step \(median of 3\), [\d,]+ tokens/s, .* MFU [\d.]+%", out), out
    for rows in (1, 8):
        assert re.search(rf"decode batch {rows}: [\d,.]+ new tokens/s .* HBM bound [\d,]+ tokens/s, [\d.]+% of it", out), out
    assert bench.card(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu"})(), 0, 0)[1:] == (989e12, 3350e9)
