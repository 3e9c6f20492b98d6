"""Smoke test of tools/bench_train.py: a tiny shape, both frameworks, the table's rows and columns."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench_train.py")


@pytest.mark.parametrize("extra", [[], ["--dtype", "bfloat16", "--remat"]], ids=["fp32", "bf16-remat"])
def test_bench_quick_prints_the_table(tmp_path, extra):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
    out = subprocess.run(
        [sys.executable, BENCH, "--quick", "--json", str(tmp_path / "rows.json"), *extra],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("shape", "framework", "compile s", "step ms", "tokens/s", "MFU", "peak MB", "vs HF tokens/s", "HF peak / peak"):
        assert col in header
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    assert [r[header.index("framework")].split(" ")[0] for r in rows] == ["gptjax", "transformers"]
    for r in rows:
        assert len(r) == len(header)
        assert float(r[header.index("step ms")]) > 0
        assert float(r[header.index("tokens/s")]) > 0
        assert float(r[header.index("peak MB")]) >= 0
    assert rows[0][header.index("vs HF tokens/s")].endswith("x")
    assert (tmp_path / "rows.json").exists()
    footer = out.stdout.strip().splitlines()[-1]
    assert ("; bfloat16, gptjax remat." in footer) == bool(extra) and ("; float32." in footer) != bool(extra)


def test_bench_refuses_an_unknown_dtype_in_one_line():
    out = subprocess.run(
        [sys.executable, BENCH, "--dtype", "float16"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "--dtype" in last and "float16" in last and "float32" in last and "bfloat16" in last
