"""`gptjax.aot`: the TPU compile of the real train and eval steps and of the sampler (libtpu, no
TPU), per-chip memory against the analytic figure, eval without full logits, the search for a
micro-batch that fits, and its one-line errors; `gptjax.load` onto a mesh.

The compiling tests need libtpu (in the test extra: `pip install -e ".[test]"`) and are
skipped without it; the rest run anywhere."""

from __future__ import annotations

import dataclasses
import os

import pytest

from gptjax import aot, loss
from gptjax import config as config_lib
from gptjax.aot import topology as topology_lib
from gptjax.aot.report import outcome
from gptjax.chips import TPUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not aot.libtpu_installed(), reason='libtpu is not installed (pip install -e ".[tpu]")')


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_topology_is_one_line_exit_2(capsys):
    for topology in ("v9z:2x2", "v5e-16", "v5e:2x"):
        with pytest.raises(SystemExit) as e:
            aot.main(["--config", os.path.join(ROOT, "configs/gpt2_124m.py"), "--topology", topology])
        assert e.value.code == 2
        line = _one_error_line(capsys)
        assert repr(topology) in line and "v5e:2x2" in line


def test_missing_libtpu_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(topology_lib, "libtpu_installed", lambda: False)
    with pytest.raises(SystemExit) as e:
        aot.main(["--topology", "v5e:2x2"])
    assert e.value.code == 2
    assert 'pip install -e ".[tpu]"' in _one_error_line(capsys)


def test_parse_topology():
    assert aot.parse_topology("v5e:4x4") == (TPUS["v5e"], (4, 4))
    assert aot.parse_topology("V4:2x2x1") == (TPUS["v4"], (2, 2, 1))


def test_parse_oom():
    gib = 2**30
    msg = "RESOURCE_EXHAUSTED: ... the total memory required for HLO temporaries (20.00G) exceeds available HBM (15.75G)."
    assert aot.parse_oom(msg) == (20 * gib, int(15.75 * gib))
    assert aot.parse_oom("Ran out of memory in memory space hbm. Used 17.50G of 15.75G hbm.") == (int(17.5 * gib), int(15.75 * gib))
    assert aot.parse_oom("INVALID_ARGUMENT: something else") is None


@pytest.mark.parametrize("refuses", [True, False], ids=["compiler-refuses", "compiler-accepts-too-much"])
@pytest.mark.parametrize("per_row", [1.0, 7.3, 60.0, 400.0])
def test_largest_fitting_finds_the_largest_candidate_under_the_limit(per_row, refuses):
    """Against a compiler stand-in whose memory grows with the micro-batch (not in a straight
    line), the search returns exactly the largest candidate that fits, in a few compiles:
    whether the compiler refuses what is too big or (as libtpu can) accepts a program larger
    than the chip's HBM."""
    limit, fixed = 1000, 150
    need = lambda m: int(fixed + per_row * m + 0.02 * m * m)
    candidates = aot.micro_batches(512, 4)
    compiled: list[int] = []

    def compile_at(m: int) -> aot.Compiled:
        compiled.append(m)
        if need(m) > limit and refuses:
            return aot.Compiled("train", 0.0, oom_used=need(m), oom_limit=limit, hbm=limit)
        return aot.Compiled("train", 0.0, temp=need(m), hbm=limit)

    first = compile_at(512)
    fitting = [m for m in candidates if need(m) <= limit]
    result = aot.largest_fitting(candidates, {512: first}, fixed, compile_at)
    if not fitting:
        assert result is None
    else:
        assert result is not None and result[0] == max(fitting)
    assert len(compiled) <= 5


def test_a_program_over_the_chips_hbm_does_not_fit_though_the_compiler_accepted_it():
    """libtpu accepted a 19 GiB xl train step for a 16 GiB v5e chip: the outcome, the table's
    fits row and the verdict all say it does not fit."""
    import re

    chip = TPUS["v5e"]
    over = aot.Compiled("train", 0.0, argument=5 << 30, temp=14 << 30, hbm=chip.hbm_bytes)
    within = aot.Compiled("train", 0.0, argument=5 << 30, temp=10 << 30, hbm=chip.hbm_bytes)
    assert not over.refused and not over.fits and within.fits
    assert outcome(over).startswith("does not fit: needs 19.00 GiB of 16.00 GiB")
    columns = [aot.Column(t, c, "", 4096, 2e12, None) for t, c in (("over", over), ("within", within))]
    report = aot.Report("x", "v5e:2x2", chip, 4, {"fsdp": 4}, 1, 1, 64, 1, 64, columns, over.fits, None)
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in aot.format_report(report).splitlines())}
    assert rows["fits"] == ["no (over the chip's 16 GiB)", "yes"]
    assert rows["temporaries"] == ["14.00 GiB", "10.00 GiB"]
    assert aot.format_report(report).splitlines()[-1] == "verdict: does not fit at any micro-batch; use a larger slice, more fsdp, or a smaller model"
    unsearched = dataclasses.replace(report, searched=False)
    assert aot.format_report(unsearched).splitlines()[-1].startswith("verdict: does not fit as configured (without --no_search")


def test_micro_batches():
    assert aot.micro_batches(512, 4) == [512, 256, 128, 64, 32, 16, 8, 4]
    assert aot.micro_batches(48, 8) == [48, 24, 16, 8]


@needs_libtpu
def test_the_124m_recipe_on_v5e_2x2_holds_12_bytes_per_parameter_per_fsdp_chip_and_eval_no_more():
    """The 124M recipe (bf16 compute, fp32 parameters, GPT-2's padded vocabulary, the platform's
    attention, fsdp over the slice), made narrow and shallow to compile in a fraction of the
    time: what the test checks does not depend on the width or depth. Train step: parameters
    (fp32) and AdamW's two moments, 12 bytes per parameter, split over fsdp=4. Eval step: its
    temporaries are at most the train step's. The blocks are scanned (model.scan_layers), which
    leaves the state as it is and compiles in a third of the time."""
    rows, seq = 4, 128
    config = config_lib.load_config(os.path.join(ROOT, "configs/gpt2_124m.py"))
    config_lib.apply_overrides(config, [("train.batch_size", str(rows)), ("train.seq_len", str(seq)), ("train.grad_accum", "1"),
                                     ("model.scan_layers", "true"), ("model.n_layer", "2"), ("model.n_embd", "128"),
                                     ("model.n_head", "4")])
    report = aot.check(config, "v5e:2x2", programs=("train", "eval"))
    assert report.n_devices == 4 and report.mesh["fsdp"] == 4 and report.fits
    train, evaluation = report.columns
    assert report.n_params > 50304 * 128  # GPT-2's vocabulary, padded, is most of it
    analytic = report.n_params * 12 / 4
    batch_bytes = 3 * rows * seq * 4 // 4  # inputs, targets, weights: 4 bytes per token, per chip
    assert train.compiled.argument - batch_bytes == pytest.approx(analytic, rel=0.10)
    assert sum(train.state) == pytest.approx(analytic, rel=0.01)
    assert train.compiled.flops > 0 and train.compiled.bytes_accessed > 0
    assert 0 < evaluation.compiled.temp <= train.compiled.temp
    text = aot.format_report(report)
    assert "fits as configured" in text and "TPU v5 lite" in text


@needs_libtpu
def test_oversized_batch_is_reported_with_the_micro_batch_that_fits(capsys):
    """A small model with a batch far beyond a v5e chip's 16 GiB: refused, then the search
    names (and compiles) the largest micro-batch that fits."""
    overrides = [
        "--config.model.n_layer=1",
        "--config.model.n_embd=128",
        "--config.model.n_head=4",
        "--config.model.vocab_size=256",
        "--config.model.block_size=1024",
        "--config.train.seq_len=1024",
        "--config.train.batch_size=8192",
    ]
    code = aot.main(["--topology", "v5e:2x2", "--programs", "train", *overrides])
    out = capsys.readouterr().out
    assert code == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: does not fit; the largest micro-batch that fits is ")
    micro = int(verdict.split("fits is ")[1].split(":")[0])
    assert micro < 8192 and 8192 % micro == 0
    assert f"--config.train.grad_accum={8192 // micro}" in verdict
    assert f"train, micro-batch {micro}" in out


def test_roofline_takes_the_slower_bound_over_the_whole_step():
    """Loop-body figures count once per micro-batch; the slower of compute and HBM traffic wins."""
    chip = TPUS["v5e"]
    body = aot.Compiled("train", 0.0, flops=1e12, bytes_accessed=1e9)
    column = aot.Column("train", body, "", tokens=4096, model_flops=2e12, state=None, repeats=4)
    r = aot.roofline(column, chip)
    assert r.bound == "compute" and r.seconds == pytest.approx(4e12 / chip.peak_flops)
    assert r.mfu == pytest.approx(0.5) and r.tokens_per_s == pytest.approx(4096 / r.seconds)
    heavy = aot.Compiled("train", 0.0, flops=1e12, bytes_accessed=1e12)
    r = aot.roofline(aot.Column("train", heavy, "", 4096, 2e12, None, repeats=4), chip)
    assert r.bound == "HBM" and r.seconds == pytest.approx(4e12 / chip.hbm_bytes_per_s)


def test_with_scan_layers_the_cost_rows_are_not_shown():
    """XLA counts the layer scan's body once: a scanned column shows no HLO FLOPs, HBM bytes or
    roofline (they would be one layer's), while its memory is shown as for any column."""
    import re

    body = aot.Compiled("train", 0.0, temp=3 << 30, flops=1e12, bytes_accessed=1e9)
    columns = [aot.Column(title, body, "", 4096, 2e12, None, repeats=4, scanned=title == "scanned")
               for title in ("unrolled", "scanned")]
    report = aot.Report("x", "v5e:2x2", TPUS["v5e"], 4, {"data": 4}, 1, 1, 1, 1, 1, columns, True, None)
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in aot.format_report(report).splitlines())}
    for label in ("HLO FLOPs per chip", "HLO HBM bytes per chip", "roofline time per call", "MFU at roofline time"):
        unrolled, scanned = rows[label]
        assert scanned == "n/a (scan_layers; --layer_costs)" and unrolled != scanned, (label, rows[label])
    assert rows["HLO FLOPs per chip"][0] == "4e+12"
    unrolled, scanned = rows["temporaries"]
    assert unrolled == scanned and "3.00 GiB" in scanned


@needs_libtpu
def test_layer_costs_give_a_scanned_step_the_unrolled_steps_flops_and_bytes():
    """With --layer_costs a 4-layer scanned model's train step carries the FLOPs and HBM bytes
    of the same model compiled unrolled (from its 1- and 2-layer compiles), where the scan's own
    figures count one layer."""
    overrides = [("model.n_layer", "4"), ("model.n_embd", "64"), ("model.n_head", "4"), ("model.block_size", "128"),
                 ("model.vocab_size", "256"), ("train.seq_len", "128"), ("train.batch_size", "8"), ("train.grad_accum", "2")]

    def report(scan: bool, layer_costs: bool) -> aot.Report:
        config = config_lib.load_config("")
        config_lib.apply_overrides(config, [*overrides, ("model.scan_layers", str(scan).lower())])
        return aot.check(config, "v5e:2x2", programs=("train",), layer_costs=layer_costs)

    unrolled, scanned = report(False, False), report(True, True)
    for u, s in zip(unrolled.columns, scanned.columns):
        assert s.scanned and s.unrolled is not None and u.counted
        # --layer_costs scales XLA's figures of one micro-batch by the micro-batches, as did the
        # unrolled step's before the counts (which count the update after the loop once).
        assert s.hlo_flops == pytest.approx(u.compiled.flops * u.repeats, rel=1e-3), s.title
        assert s.hbm_bytes == pytest.approx(u.compiled.bytes_accessed * u.repeats, rel=0.01), s.title
        assert s.hlo_flops == pytest.approx(u.hlo_flops, rel=0.02), s.title
        assert s.compiled.flops * s.repeats < 0.6 * u.hlo_flops  # the scan's own count: far from the whole
    text = aot.format_report(scanned)
    assert "n/a" not in text and "from 1- and 2-layer unrolled compiles" in text


@needs_libtpu
def test_eval_step_holds_no_full_logits():
    """A narrow model with GPT-2's vocabulary, where an eval batch's [rows, seq, vocab] fp32
    logits would dwarf everything else: the eval step's whole footprint on v5e:2x2 is a small
    part of them (the head is applied a sequence chunk at a time; here with chunks of 64 MiB of
    logits per chip, where an accelerator's default budget, 1 GiB, would hold them all)."""
    rows, seq, vocab = 16, 1024, 50257
    overrides = [("model.vocab_size", str(vocab)), ("model.n_layer", "1"), ("model.n_embd", "64"), ("model.n_head", "4"),
                 ("model.block_size", str(seq)), ("train.seq_len", str(seq)), ("train.batch_size", str(rows))]
    config = config_lib.base_config()
    config_lib.apply_overrides(config, overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss, "ACCELERATOR_LOGITS_CHUNK_BYTES", 64 * 2**20)
        (evaluation,) = aot.check(config, "v5e:2x2", programs=("eval",)).columns
    logits_per_chip = rows * seq * vocab * 4 / 4
    assert evaluation.compiled.flops > 0 and evaluation.compiled.total < logits_per_chip / 4


@needs_libtpu
def test_sampler_prefill_and_decode_compile_for_v5e_2x2_with_sharded_parameters():
    """The sampler's programs compile for the slice with parameters split over fsdp x tensor:
    each chip holds a quarter of the (decode-layout) parameters, and the table shows both."""
    overrides = [("model.n_layer", "1"), ("model.n_embd", "64"), ("model.n_head", "4"), ("model.block_size", "32"),
                 ("train.seq_len", "32"), ("train.batch_size", "4"), ("mesh.data", "1"), ("mesh.fsdp", "2"),
                 ("mesh.tensor", "2")]
    config = config_lib.base_config()
    config_lib.apply_overrides(config, overrides)
    report = aot.check(config, "v5e:2x2", programs=("prefill", "decode"), sample_rows=2, prompt_len=8)
    prefill, step = report.columns
    assert (prefill.title, step.title) == ("prefill", "decode step")
    for c in (prefill.compiled, step.compiled):
        assert c.oom_used is None and c.flops > 0 and c.seconds > 0 and c.total > c.argument
    whole = report.n_params * 4  # fp32, in either layout
    assert whole / 4 <= prefill.compiled.argument < whole / 2  # split, not replicated
    assert prefill.compiled.argument < step.compiled.argument < whole  # the decode loop also takes the cache
    text = aot.format_report(report)
    assert "prefill" in text and "decode step" in text and "2 x 1 (cache 32)" in text


def test_load_onto_a_mesh_samples_the_single_device_tokens(trained_run):
    """`gptjax.load(path, mesh=...)` splits the parameters of the shared run (`trained_run`:
    vocabulary 300, width 32) over fsdp x tensor (8 CPU devices) and samples the same greedy
    tokens as the model loaded on one device."""
    import jax

    import gptjax
    from gptjax import sharding
    from gptjax.errors import UserError

    path = trained_run.workdir
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices()[:8])
    split = gptjax.load(path, mesh=mesh)
    alone = gptjax.load(path)
    wte = split.params["wte"]["embedding"]
    assert len(wte.sharding.device_set) == 8 and wte.addressable_shards[0].data.shape == (300 // 4, 32 // 2)
    prompts = [[5, 17, 42], [7], [100, 3, 9, 250, 11]]
    controls = dict(max_new_tokens=40, temperature=0.0, stop_tokens=())  # past the window: a crop and a second prefill
    assert split.generate_tokens(prompts, **controls) == alone.generate_tokens(prompts, **controls)
    with pytest.raises(UserError, match="not both"):
        gptjax.load(path, device=jax.devices()[0], mesh=mesh)
