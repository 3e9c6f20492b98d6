"""The check's outcome (`Report`), the table `python -m gptjax.aot` prints from it, and the
list of the ops that move the most bytes and do the most FLOPs (`--top_ops`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from gptjax.aot.compile import Compiled
from gptjax.aot.roofline import Column, roofline
from gptjax.chips import Chip


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of `check`: what was compiled for which slice, and the verdict."""

    config_name: str
    topology: str
    chip: Chip
    n_devices: int
    mesh: dict[str, int]
    n_params: int
    vocab_size: int
    batch_size: int
    seq_len: int
    grad_accum: int
    columns: list[Column]
    fits: bool  # the train step as configured
    fitting_micro_batch: int | None  # from the search, when it did not fit
    searched: bool = True  # whether a micro-batch that fits was searched for


def outcome(c: Compiled) -> str:
    """One compile's outcome for the progress log: fits or not, in how many bytes."""
    if c.fits:
        return f"fits: {_bytes(c.total)} per chip ({c.seconds:.0f} s)"
    return f"does not fit: needs {_bytes(c.total)} of {_bytes(c.limit)} ({c.seconds:.0f} s)"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


Cell = Callable[[Column], str]


def _if_compiled(cell: Cell) -> Cell:
    """A cell from the compiler's analysis: '-' where it refused the program."""
    return lambda c: "-" if c.compiled.refused else cell(c)


def _if_counted(cell: Cell) -> Cell:
    """A cell from the compiler's cost analysis: not shown where it counts one layer of n."""
    return _if_compiled(lambda c: cell(c) if c.counted else "n/a (scan_layers; --layer_costs)")


def _fits(chip: Chip) -> Cell:
    """The fits cell: yes, or why not (the compiler's refusal, or over the chip's HBM)."""
    return lambda c: (
        "yes"
        if c.compiled.fits
        else f"no (compiler: {_bytes(c.compiled.limit)} usable)"
        if c.compiled.refused
        else f"no (over the chip's {chip.hbm_gib:g} GiB)"
    )


def _times(c: Column, chip: Chip) -> str:
    r = roofline(c, chip)
    return " / ".join(_seconds(t) for t in (r.compute_s, r.hbm_s, r.ici_s))


def _rows(chip: Chip, n_devices: int = 1) -> list[tuple[str, Cell]]:
    """The table's rows: a label and how each column's cell reads."""
    per_chip_tokens = lambda c: max(c.tokens / max(n_devices, 1), 1e-9)
    return [
        ("rows x tokens x micro-batches", lambda c: c.shape),
        ("parameters (shardings)", lambda c: _bytes(c.state[0]) if c.state else "-"),
        ("optimizer state (shardings)", lambda c: _bytes(c.state[1]) if c.state else "-"),
        ("arguments", _if_compiled(lambda c: _bytes(c.compiled.argument))),
        ("outputs not aliased to them", _if_compiled(lambda c: _bytes(c.compiled.output - c.compiled.alias))),
        ("temporaries", _if_compiled(lambda c: _bytes(c.compiled.temp))),
        ("generated code", _if_compiled(lambda c: _bytes(c.compiled.code))),
        ("total per chip", lambda c: _bytes(c.compiled.total)),
        (f"of HBM ({chip.hbm_gib:g} GiB)", lambda c: f"{100 * c.compiled.total / chip.hbm_bytes:.0f}%"),
        ("fits", _fits(chip)),
        ("HLO FLOPs per chip", _if_counted(lambda c: f"{c.hlo_flops:.3g}")),
        ("model FLOPs per chip (6N + attention)", lambda c: f"{c.model_flops:.3g}"),
        ("HLO HBM bytes per chip", _if_counted(lambda c: _bytes(c.hbm_bytes))),
        ("HBM bytes per token per chip", _if_counted(lambda c: f"{c.hbm_bytes / per_chip_tokens(c) / 1e6:.3g} MB")),
        ("ICI bytes per chip (collectives)", _if_counted(lambda c: _bytes(c.ici_bytes))),
        ("compute / HBM / ICI time", _if_counted(lambda c: _times(c, chip))),
        ("roofline time per call", _if_counted(lambda c: f"{_seconds(roofline(c, chip).seconds)} ({roofline(c, chip).bound}-bound)")),
        ("roofline tokens/s (slice)", _if_counted(lambda c: f"{roofline(c, chip).tokens_per_s:,.0f}")),
        ("MFU at roofline time", _if_counted(lambda c: f"{100 * roofline(c, chip).mfu:.0f}%")),
        ("compile time", lambda c: f"{c.compiled.seconds:.0f} s"),
    ]


def _verdict(report: Report) -> str:
    if report.fits:
        return "verdict: the train step fits as configured"
    if report.fitting_micro_batch is not None:
        m = report.fitting_micro_batch
        return (
            f"verdict: does not fit; the largest micro-batch that fits is {m}: "
            f"--config.train.grad_accum={report.batch_size // m}"
        )
    if not report.searched:
        return "verdict: does not fit as configured (without --no_search the tool finds the micro-batch that fits)"
    return "verdict: does not fit at any micro-batch; use a larger slice, more fsdp, or a smaller model"


def format_report(report: Report) -> str:
    """The table `python -m gptjax.aot` prints."""
    chip = report.chip
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    lines = [
        f"{report.config_name or 'config'} on {report.topology}: {report.n_devices} x {chip.device_kind} "
        f"({chip.hbm_gib:g} GiB HBM, {chip.bf16_tflops:g} TFLOP/s bf16, {chip.hbm_gbps:g} GB/s per chip)",
        f"model {report.n_params / 1e6:.1f}M parameters (vocabulary {report.vocab_size}); mesh {mesh}; "
        f"batch {report.batch_size} x {report.seq_len} tokens, grad_accum {report.grad_accum}",
        "",
    ]
    rows = [(label, [cell(c) for c in report.columns]) for label, cell in _rows(chip, report.n_devices)]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(c.title), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(report.columns)]
    lines.append(" " * width + "  " + "  ".join(c.title.rjust(w) for c, w in zip(report.columns, cols)))
    for label, cells in rows:
        lines.append(label.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(cells, cols)))
    if any(c.compiled.counts is not None and not c.unrolled for c in report.columns):
        lines.append("HLO figures count every loop iteration (micro-batches, head chunks, scanned layers) and the Pallas "
                     "kernels' work (splash attention, the head's cross entropy) from their block sizes; HBM: only arrays in HBM (not those the compiler keeps in VMEM); ICI: the "
                     "bytes each chip sends in collectives")
    unknown = sum(c.compiled.counts.unknown_loops for c in report.columns if c.compiled.counts is not None)
    if unknown:
        lines.append(f"{unknown} loop(s) without a static trip count counted once (the decode loop runs until its "
                     "tokens are done: its column is one step)")
    if any(c.unrolled for c in report.columns):
        lines.append("HLO figures of scanned steps: c(1) + (n_layer - 1) * (c(2) - c(1)) from 1- and 2-layer unrolled compiles")
    lines.append("")
    lines.append(_verdict(report))
    return "\n".join(lines)


_TOP_KEYS = (("hbm_bytes", "HBM bytes", _bytes), ("flops", "FLOPs", lambda v: f"{v:.3g}"), ("ici_bytes", "ICI bytes", _bytes))


def format_top_ops(report: Report, n: int) -> str:
    """Per compiled column: the `n` ops (fusions, kernels, collectives, ...) that move the most
    HBM bytes, do the most FLOPs and send the most ICI bytes in one call, each with its share
    of the column's total, how many times it runs per call and where in the program it comes
    from (its op_name)."""
    lines: list[str] = []
    for c in report.columns:
        counts = c.compiled.counts
        if counts is None:
            continue
        for key, label, fmt in _TOP_KEYS:
            top = counts.top(n, key)
            if not top:
                continue
            lines.append(f"{c.title}: top {len(top)} ops by {label} per call")
            table = [(f"{100 * share:.1f}%", fmt(getattr(op, key)), f"x{op.times}", op.kind, op.name, op.what)
                     for op, share in top]
            widths = [max(len(row[i]) for row in table) for i in range(5)]
            for row in table:
                lines.append("  " + "  ".join(v.rjust(w) if i < 3 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                             + "  " + row[5])
            lines.append("")
    return "\n".join(lines).rstrip()
