"""tools/bench_prepare.py on a tiny corpus: it makes the corpus, prepares it pinned to 1 and 2
cores, and prints the rates, the speed-up and the projection (figures not checked: timing)."""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_prepare  # noqa: E402


def test_bench_prepare_prints_rates_speedup_and_projection(tmp_path, capsys):
    cores = "1,2" if len(os.sched_getaffinity(0)) >= 2 else "1"
    bench_prepare.main(["--mb", "0.3", "--repeats", "1", "--vocab", "300", "--cores", cores, "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"^1 core\(s\): 0M characters, .* = \d+\.\d\dM characters/s$", out, re.M), out
    chars = [int(n.replace(",", "")) for n in re.findall(r"(\d+)M characters,", out)]
    assert chars and len(set(chars)) == 1  # every core count prepared the same corpus
    if cores == "1,2":
        assert re.search(r"^speed-up 1 -> 2 cores: \d+\.\d\dx", out, re.M)
        assert re.search(r"^projection: 45 GB of text on 4 hosts x 112 cores at .* = \d+\.\d min$", out, re.M)
    assert os.path.exists(tmp_path / "corpus-parquet-0.3MB" / "done")
