"""`gptjax.aot.counts`: FLOPs, HBM and ICI bytes per chip with every loop iteration counted.

One tiny model on v5e:2x2 (fsdp over the 4 chips), its train step compiled three times: with
its loops (2 micro-batches, 2 scanned layers, 2 head chunks), the same with every
`jax.lax.scan` unrolled (the reference: XLA's plain cost analysis is exact where nothing
loops), and with the splash kernel. The parsing and counting of HLO text is tested on
hand-written modules, which need no compiler.

The compiling tests need libtpu (`pip install -e ".[test]"`) and are skipped without it."""

from __future__ import annotations

import functools
import re

import jax
import pytest

from gptjax import aot, loss
from gptjax import config as config_lib
from gptjax.aot import counts as counts_lib
from gptjax.aot.collectives import collective_kind
from gptjax.aot.hlo import parse_module, shape_bytes
from gptjax.chips import TPUS

needs_libtpu = pytest.mark.skipif(not aot.libtpu_installed(), reason='libtpu is not installed (pip install -e ".[tpu]")')

LAYERS, EMBD, HEADS, SEQ, BATCH, ACCUM = 2, 64, 4, 128, 16, 2
# A chip's fp32 logits of a micro-batch (8 rows over fsdp=4: 2 x 128 x 256) are 256 KiB: 2 chunks.
CHUNK_BYTES = 128 * 1024


def _check(**model: str) -> aot.Report:
    overrides = [("model.n_layer", str(LAYERS)), ("model.n_embd", str(EMBD)), ("model.n_head", str(HEADS)),
                 ("model.block_size", str(SEQ)), ("model.vocab_size", "256"), ("model.scan_layers", "true"),
                 ("train.seq_len", str(SEQ)), ("train.batch_size", str(BATCH)), ("train.grad_accum", str(ACCUM)),
                 ("mesh.data", "1"), ("mesh.fsdp", "4"), *((f"model.{k}", v) for k, v in model.items())]
    config = config_lib.base_config()
    config_lib.apply_overrides(config, overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss, "ACCELERATOR_LOGITS_CHUNK_BYTES", CHUNK_BYTES)  # compiled for a TPU
        return aot.check(config, "v5e:2x2", programs=("train",), search=False)


@pytest.fixture(scope="module")
def looped() -> aot.Report:
    return _check()


@pytest.fixture(scope="module")
def unrolled() -> aot.Report:
    """The same step with every scan (micro-batches, layers, head chunks) unrolled: no loops."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))
        return _check()


@needs_libtpu
def test_counts_equal_the_unrolled_compile(looped, unrolled):
    """Micro-batch loop x2, scanned layers x2 (forward and backward), head chunks x2: the
    counted FLOPs are the unrolled step's (XLA's own count of the looped step is far below);
    bytes counted in every memory space are at least the unrolled step's (the scan adds
    stacking copies of its own), and HBM bytes about the same."""
    (step,), (reference,) = looped.columns, unrolled.columns
    counts, ref = step.compiled.counts, reference.compiled.counts
    # Nothing loops: XLA's count, plus the FLOPs of the compiler's own online-softmax kernel where it made one.
    kernels = sum(o.flops for o in ref.ops if o.kind == "kernel")
    assert ref.loops == () and ref.flops == pytest.approx(reference.compiled.flops + kernels)
    trips = sorted(n for _, n in counts.loops)
    assert counts.unknown_loops == 0 and trips.count(2) >= 4, counts.loops
    assert step.compiled.flops < 0.6 * reference.compiled.flops  # XLA counts each loop body once
    assert step.hlo_flops == pytest.approx(reference.hlo_flops, rel=0.02)
    assert step.hlo_flops >= step.model_flops and reference.hlo_flops >= reference.model_flops
    # Bytes as XLA counts them (every memory space): the loops' iterations are all there.
    everywhere = counts_lib.count(re.sub(r"S\(\d+\)", "", step.compiled.executable.as_text()), 0.0, 0.0)
    assert reference.compiled.bytes_accessed * 0.95 <= everywhere.hbm_bytes <= 2 * reference.compiled.bytes_accessed
    assert step.compiled.bytes_accessed < everywhere.hbm_bytes
    # HBM only (a tiny model lives mostly in VMEM): the looped step's about the unrolled one's.
    assert 0.8 * ref.hbm_bytes <= step.hbm_bytes <= 2 * ref.hbm_bytes < reference.compiled.bytes_accessed


@needs_libtpu
def test_the_per_op_model_matches_xla_where_nothing_loops(unrolled):
    """The per-instruction costs the loop iterations are counted with, summed over the
    unrolled step, are XLA's own totals for it (FLOPs within 1%, bytes by XLA's rule within 3%)."""
    (reference,) = unrolled.columns
    text = reference.compiled.executable.as_text()
    module = parse_module(text)
    times, _, _ = counts_lib.multiplicities(module)
    insts = [(module.computations[n], i) for n in times for i in module.computations[n].instructions.values()]
    flops = sum(counts_lib.instruction_flops(module, c, i) for c, i in insts)  # XLA's: kernels count none
    xla_rule = sum(counts_lib.instruction_bytes(module, c, i, physical=False) for c, i in insts)
    assert flops == pytest.approx(reference.compiled.flops, rel=0.01)
    assert xla_rule == pytest.approx(reference.compiled.bytes_accessed, rel=0.03)


@needs_libtpu
def test_fsdp_collectives_are_counted(looped):
    """fsdp over 4 chips: the parameters are all-gathered and the gradients reduce-scattered;
    a chip sends at least 3/4 of the (fp32) parameters once per micro-batch for the gathers."""
    (step,) = looped.columns
    counts = step.compiled.counts
    collectives = [o for o in counts.ops if o.kind == "collective"]
    text = step.compiled.executable.as_text()
    module = parse_module(text)
    kinds = {collective_kind(module, i) for c in module.computations.values() for i in c.instructions.values()} - {None}
    assert {"all-gather", "reduce-scatter"} <= kinds or {"all-gather", "all-reduce"} <= kinds, kinds
    assert counts.ici_bytes == pytest.approx(sum(o.ici_bytes for o in collectives)) and step.ici_bytes > 0
    params_bytes = looped.n_params * 4
    assert counts.ici_bytes >= ACCUM * 0.75 * params_bytes * 0.9
    r = aot.roofline(step, TPUS["v5e"])
    assert r.ici_s == pytest.approx(counts.ici_bytes / TPUS["v5e"].ici_bytes_per_s)
    assert r.seconds == max(r.compute_s, r.hbm_s, r.ici_s)


@needs_libtpu
def test_splash_kernels_are_counted_from_their_blocks(looped):
    """With attention=splash the kernels have no XLA cost; counted from their blocks (one
    128-token block: the whole causal square) they do 4 + 10 = 14 T^2 d FLOPs per head and
    row (forward, the fused dq/dk/dv backward: 7/6 of the einsum's 12 T^2 d, the backward
    recomputing the scores), so the step's FLOPs are the einsum step's plus a sixth of its
    attention matmuls."""
    (einsum,) = looped.columns
    (splash,) = _check(attention="splash").columns
    kernels = [o for o in splash.compiled.counts.ops if o.kind == "kernel" and "splash" in o.name]
    assert {k for o in kernels for k in ("fwd", "dq", "dkv") if k in o.name} == {"fwd", "dkv"}
    head_rows = BATCH // 4 * HEADS * LAYERS  # per chip, over the step's micro-batches
    d = EMBD // HEADS
    assert sum(o.flops for o in kernels) == 14 * SEQ * SEQ * d * head_rows
    assert splash.compiled.flops < splash.hlo_flops - 0.9 * sum(o.flops for o in kernels)  # XLA's misses them
    expected = einsum.hlo_flops + 2 * SEQ * SEQ * d * head_rows
    assert splash.hlo_flops == pytest.approx(expected, rel=0.03)
    assert splash.hlo_flops >= splash.model_flops


@needs_libtpu
def test_top_ops_lists_the_largest_with_their_shares(looped):
    """`--top_ops 3`: per program the 3 ops with the most HBM bytes, FLOPs and ICI bytes, in
    order, with shares of the total that match their figures."""
    text = aot.format_top_ops(looped, 3)
    counts = looped.columns[0].compiled.counts
    for key, label in (("hbm_bytes", "HBM bytes"), ("flops", "FLOPs"), ("ici_bytes", "ICI bytes")):
        block = text.split(f"train step: top 3 ops by {label} per call\n")[1].split("\n\n")[0].splitlines()
        assert len(block) == 3
        shares = [float(line.split()[0].rstrip("%")) for line in block]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0
        total = sum(getattr(o, key) for o in counts.ops)
        top = counts.top(3, key)
        assert all(o.name in line.split() for (o, _), line in zip(top, block))
        assert shares[0] == pytest.approx(100 * getattr(top[0][0], key) / total, abs=0.06)
    table = aot.format_report(looped)
    assert "HBM bytes per token per chip" in table and "ICI bytes per chip (collectives)" in table
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())}
    per_token = float(rows["HBM bytes per token per chip"][0].split()[0]) * 1e6
    assert per_token == pytest.approx(looped.columns[0].hbm_bytes / (BATCH * SEQ / 4), rel=0.01)
    assert rows["roofline time per call"][0].endswith(("(compute-bound)", "(HBM-bound)", "(ICI-bound)"))


def test_top_ops_must_not_be_negative(capsys):
    with pytest.raises(SystemExit) as e:
        aot.main(["--topology", "v5e:2x2", "--top_ops", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top_ops" in err[0]


HLO = """HloModule m, num_partitions=4

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %w = f32[128,128]{1,0:T(8,128)} constant({...})
  %y = f32[8,128]{1,0:T(8,128)} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[32,128]{1,0:T(8,128)} all-gather(%y), dimensions={0}, replica_groups={{0,1,2,3}}
  ROOT %t = (s32[], f32[8,128]) tuple(%next, %y)
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0:T(8,128)} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,128]) tuple(%zero, %a)
  %loop = (s32[], f32[8,128]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,128]{1,0:T(8,128)} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_body_counts_its_trip_count_times():
    """A hand-written module: a 6-trip loop of an [8,128] x [128,128] dot and an all-gather of
    its result over 4 chips. XLA would count the body once (the totals given here)."""
    dot_flops, dot_bytes = 2 * 8 * 128 * 128, (8 * 128 + 128 * 128 + 8 * 128) * 4
    gather_bytes = 8 * 128 * 4 + 32 * 128 * 4
    once_flops, once_bytes = dot_flops + 1, dot_bytes + gather_bytes + 8
    counts = counts_lib.count(HLO, once_flops, once_bytes)
    assert counts.loops == (("loop", 6),) and counts.unknown_loops == 0
    assert counts.flops == pytest.approx(6 * once_flops)
    dot = next(o for o in counts.ops if o.name == "y")
    assert (dot.times, dot.flops, dot.hbm_bytes) == (6, 6 * dot_flops, 6 * dot_bytes)
    assert counts.ici_bytes == 6 * 3 * 8 * 128 * 4  # (n - 1) times its operand, per iteration
    assert counts.top(1, "flops")[0][0].name == "y"


def test_padded_sizes():
    assert shape_bytes("f32[2,64]{1,0:T(8,128)}") == 8 * 128 * 4
    assert shape_bytes("bf16[3,128,256]{2,1,0:T(8,128)(2,1)}") == 3 * 128 * 256 * 2
    assert shape_bytes("(s32[], f32[5]{0:T(128)})") == 4 + 128 * 4
    assert shape_bytes("f32[1,100,200]{1,2,0:T(8,128)}") == 1 * 128 * 200 * 4  # dim 1 most minor: to 128; dim 2 to 8
