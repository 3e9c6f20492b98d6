"""tools/bench_train.py: the smoke test (a tiny shape, every framework, the table's rows and
columns), and the check that its nanoGPT reference computes what gptjax computes."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAST_COMPILE

from gptjax.sharding import cpu_cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench_train.py")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(argv, monkeypatch, capsys, in_process: bool = False) -> str:
    """`tools/bench_train.py ARGV`'s stdout, its main run in this process (it only starts the
    workers and prints their table) and its workers as subprocesses. They get one device per
    core, as a user's run does (no device count in XLA_FLAGS), and the suite's fast compiles
    (XLA's HLO passes all run; the tests check the tool's output and logic, not its timings).

    `in_process`: the workers run in this process instead (their spec and result still pass
    through JSON), for the modes whose output does not depend on the worker's devices: the
    A/B and the paired timings, whose worker is one process either way; the paired timing
    without its pauses between blocks."""
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
    module = _bench_module()
    if in_process:
        # No pause before each timed block of the paired timing (it lets the other framework's
        # threads go idle, for the timings' sake; these tests check the table, not the timings).
        monkeypatch.setattr(module, "PAIRED_PAUSE_S", 0.0)
        workers = {"ab": module.worker_ab, "paired": _keeping_torch_threads(module.worker_paired)}
        monkeypatch.setattr(module, "run_worker",
                            lambda kind, spec: json.loads(json.dumps(workers[kind](json.loads(json.dumps(spec))))))
    capsys.readouterr()
    module.main(argv)
    return capsys.readouterr().out


def _keeping_torch_threads(worker):
    """The worker, leaving torch's thread count (which the paired worker sets) as it found it."""

    def run(spec):
        import torch

        threads = torch.get_num_threads()
        try:
            return worker(spec)
        finally:
            torch.set_num_threads(threads)

    return run


def test_option_ab_times_the_step_with_and_without_an_xla_option(monkeypatch, capsys, xla_default_fusion_emitters):
    """--option_ab compiles the step with and without the option in one process (the run fails
    if the two reach different parameters, bit for bit: compiled as XLA compiles by default,
    conftest.xla_default_fusion_emitters) and prints both step times and XLA temporaries."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    option = "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"
    stdout = _bench(["--quick", "--option_ab", option], monkeypatch, capsys, in_process=True)
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    assert f"step ms, with {option}" in lines[0] and f"XLA temp MiB, with {option}" in lines[0]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[0] == "tiny" and all(float(x) > 0 for x in (row[2], row[3], row[8], row[9]))
    # --quick: the tiny shape, so the refusal comes without resolving the default config's shape (a JAX start)
    bad = subprocess.run([sys.executable, BENCH, "--quick", "--option_ab", "nonsense"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "--option_ab takes KEY=VALUE" in bad.stderr


def test_paired_ratios_are_taken_round_by_round():
    """A machine that runs at half speed in some rounds slows every framework in those rounds:
    the paired ratio is unchanged by it, while a ratio of two separate medians is not."""
    bench = _bench_module()
    fast = {"jax": 0.050, "nanogpt": 0.055, "torch": 0.070}
    slow = {k: 2 * v for k, v in fast.items()}
    # gptjax met the slow stretch more often than the references (as separate runs can).
    rounds = [fast, slow, slow, dict(slow, nanogpt=fast["nanogpt"]), fast]
    out = bench.paired_summary(rounds)
    assert out["rounds"] == 5
    assert out["step_s"]["jax"] == pytest.approx(0.100)  # the median block
    # Three of five rounds give nanoGPT / gptjax = 1.1; the one where only nanoGPT ran fast gives 0.55.
    assert out["ratio"]["nanogpt"] == pytest.approx(1.1)
    assert out["ratio_range"]["nanogpt"] == pytest.approx((0.55, 1.1))
    assert out["jax_faster_rounds"] == {"nanogpt": 4, "torch": 5}
    assert out["ratio"]["torch"] == pytest.approx(1.4)


# the worker runs here: transformers' step converts its loss to a float (in its subprocess too)
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_paired_prints_each_references_ratio_from_one_process(monkeypatch, capsys):
    """In bfloat16 with gptjax's remat (the table test below runs float32): each framework's
    step in that dtype, timed in turns."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    stdout = _bench(["--quick", "--paired", "3", "--dtype", "bfloat16", "--remat"], monkeypatch, capsys, in_process=True)
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    assert "vs nanoGPT tokens/s" in lines[0] and "vs HF tokens/s" in lines[0]
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert row[0] == "tiny"
    jax_ms, tokens, nano_ms, hf_ms = float(row[2]), float(row[3]), float(row[4]), float(row[6])
    assert min(jax_ms, nano_ms, hf_ms) > 0
    tiny = _bench_module().SHAPES["tiny"]
    assert tokens == pytest.approx(tiny["batch"] * tiny["seq"] / (jax_ms / 1e3), rel=0.01)
    for cell in (row[5], row[7]):  # "1.06x (0.85-1.38; 17 of 20)"
        ratio, lo, hi, faster, rounds = re.match(r"([\d.]+)x \(([\d.]+)-([\d.]+); (\d+) of (\d+)\)", cell).groups()
        assert float(lo) <= float(ratio) <= float(hi) and int(rounds) == 3 and 0 <= int(faster) <= 3
    assert stdout.strip().splitlines()[-1].endswith("; bfloat16")


def test_bench_quick_prints_the_table(tmp_path, monkeypatch, capsys):
    """The three workers (subprocesses, one device per core for gptjax) in float32; the
    bfloat16-with-remat steps are timed by the paired test and the footer below."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    extra = []
    stdout = _bench(["--quick", "--json", str(tmp_path / "rows.json"), *extra], monkeypatch, capsys)
    lines = [l for l in stdout.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("shape", "framework", "compile s", "step ms", "tokens/s", "MFU", "peak MB", "vs HF tokens/s",
                "vs nanoGPT tokens/s", "HF peak / peak"):
        assert col in header
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    assert [r[header.index("framework")].split(" ")[0] for r in rows] == ["gptjax", "transformers", "nanoGPT"]
    devices = max(d for d in range(1, cpu_cores() + 1) if 2 % d == 0)  # one per core, as many as divide the tiny batch of 2
    assert rows[0][header.index("framework")] == f"gptjax (JAX, {devices} device{'s' * (devices > 1)})"
    for r in rows:
        assert len(r) == len(header)
        assert float(r[header.index("step ms")]) > 0
        assert float(r[header.index("tokens/s")]) > 0
        assert float(r[header.index("peak MB")]) >= 0
    step_ms = [float(r[header.index("step ms")]) for r in rows]
    for col, ref in (("vs HF tokens/s", 1), ("vs nanoGPT tokens/s", 2)):
        ratios = [float(r[header.index(col)].rstrip("x")) for r in rows]
        assert ratios[ref] == 1.0
        # the row's tokens/s over the reference's; printed with two decimals
        np.testing.assert_allclose(ratios, [step_ms[ref] / ms for ms in step_ms], rtol=0.01, atol=0.006)
    assert (tmp_path / "rows.json").exists()
    footer = stdout.strip().splitlines()[-1]
    assert ("; bfloat16, gptjax remat." in footer) == bool(extra) and ("; float32." in footer) != bool(extra)


def test_bench_table_footer_names_bfloat16_and_remat(monkeypatch, capsys):
    """The table's footer with --dtype bfloat16 --remat (rows stubbed: the workers' rows are the
    table test's), and the bfloat16 matmul that the gptjax worker measures its peak with."""
    from gptjax.chips import measure_matmul_flops

    module = _bench_module()
    fake = lambda name, shape, args: [dict({c: "1" for c in module.COLUMNS}, shape=name, _matmul_gflops=1.0)]
    monkeypatch.setattr(module, "bench_shape", fake)
    capsys.readouterr()
    module.main(["--quick", "--dtype", "bfloat16", "--remat"])
    footer = capsys.readouterr().out.strip().splitlines()[-1]
    assert "; bfloat16, gptjax remat." in footer and "; float32." not in footer
    assert measure_matmul_flops(64, 1, "bfloat16") > 0


def test_bench_refuses_an_unknown_dtype_in_one_line():
    out = subprocess.run(
        [sys.executable, BENCH, "--dtype", "float16"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "--dtype" in last and "float16" in last and "float32" in last and "bfloat16" in last


def test_the_nanogpt_reference_computes_what_gptjax_computes():
    """From gptjax's initial weights, on the same batches, with the same AdamW, weight-decay mask
    and clipping (active at this clip), both trains' losses agree to fp32 rounding; the same
    check tells apart nanoGPT's own weight-decay rule (every matrix, embeddings included)."""
    pytest.importorskip("torch")
    bench = _bench_module()
    spec = dict(bench.SHAPES["tiny"], optim=dict(schedule="constant", warmup_steps=0, lr=1e-2, weight_decay=0.5, grad_clip=0.5))
    ours, params, fields = bench.gptjax_losses(spec, 4)
    theirs = bench.nanogpt_losses(spec, params, fields, 4)
    assert len(set(ours)) == 4 and all(np.isfinite(ours))
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)

    settings = bench.torch_optim_settings(spec)
    assert "transformer.h.0.attn.c_attn.weight" in settings["decay"]
    assert not any(name.endswith(("bias", "wte.weight", "wpe.weight")) or ".ln_" in name for name in settings["decay"])
    decay_every_matrix = dict(settings, decay=settings["decay"] + ["transformer.wte.weight", "transformer.wpe.weight"])
    other = bench.nanogpt_losses(spec, params, fields, 4, decay_every_matrix)
    assert np.abs(np.subtract(other, ours)).max() > 1e-4
