"""A compiled program's counts for the whole call, and the roofline step time they bound.

The counts come from `gptjax.aot.counts`: the compiler's cost analysis with every loop
iteration counted (micro-batches, the tied head's sequence chunks, scanned layers, the decode
loop's steps), the Pallas kernels' work from their block sizes, and the ICI bytes of the
collectives. The roofline is the slowest of three bounds, each per chip: compute (FLOPs at
peak bf16 FLOP/s), HBM (bytes at peak HBM bandwidth) and ICI (bytes a chip sends in
collectives at the one-way sum of its links' bandwidth, as if every link were busy). A
roofline is a bound, not a measurement: it assumes the three overlap perfectly and each runs
at peak.

A `Column` built without counts (a refusal, or one made by hand) falls back to the compiler's
figures times `repeats` (the micro-batches: its loop body counted once per micro-batch), and
shows no cost figures when its layers are scanned, unless `unrolled` carries those of the same
step compiled unrolled (`--layer_costs`, which also takes precedence over the counts).
"""

from __future__ import annotations

import dataclasses

from gptjax.aot.compile import Compiled
from gptjax.chips import Chip


@dataclasses.dataclass(frozen=True)
class Column:
    """One compiled program in the table."""

    title: str
    compiled: Compiled
    shape: str  # rows x tokens it processes, as the table shows them
    tokens: int  # tokens one call processes on the whole slice
    model_flops: float  # per chip: 6N + attention per trained token, a third of that per evaluated one
    state: tuple[int, int] | None  # per-chip (parameters, optimizer state) bytes from the shardings
    repeats: int = 1  # micro-batches per call (used only without counts)
    scanned: bool = False  # the blocks run as one scan (model.scan_layers)
    unrolled: tuple[float, float] | None = None  # a scanned step's (FLOPs, HBM bytes) per micro-batch, unrolled

    @property
    def counted(self) -> bool:
        """Whether the cost figures cover the whole call."""
        return self.compiled.counts is not None or not self.scanned or self.unrolled is not None

    @property
    def hlo_flops(self) -> float:
        """FLOPs per chip for the whole call."""
        if self.unrolled:
            return self.unrolled[0] * self.repeats
        counts = self.compiled.counts
        return counts.flops if counts is not None else self.compiled.flops * self.repeats

    @property
    def hbm_bytes(self) -> float:
        """HBM bytes per chip for the whole call."""
        if self.unrolled:
            return self.unrolled[1] * self.repeats
        counts = self.compiled.counts
        return counts.hbm_bytes if counts is not None else self.compiled.bytes_accessed * self.repeats

    @property
    def ici_bytes(self) -> float:
        """Bytes per chip sent over ICI by the call's collectives (0 without counts)."""
        counts = self.compiled.counts
        return counts.ici_bytes if counts is not None else 0.0


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A call's bound step time, which bound it is, the tokens/s and MFU it implies, and each
    bound's own time."""

    seconds: float
    bound: str  # 'compute', 'HBM' or 'ICI'
    tokens_per_s: float
    mfu: float
    compute_s: float = 0.0
    hbm_s: float = 0.0
    ici_s: float = 0.0


def roofline(column: Column, chip: Chip) -> Roofline:
    """Step time bound by peak FLOP/s, by HBM bandwidth and by ICI bandwidth, whichever is
    slowest, per chip.

    The compute time uses the larger of the HLO and the model FLOPs (a column without counts
    may see a loop once); MFU is the model FLOPs over the bound's time at peak.
    """
    compute = max(column.hlo_flops, column.model_flops) / chip.peak_flops
    memory = column.hbm_bytes / chip.hbm_bytes_per_s
    ici = column.ici_bytes / chip.ici_bytes_per_s if chip.ici_gbps else 0.0
    seconds = max(compute, memory, ici, 1e-12)
    bound = "compute" if compute >= max(memory, ici) else "HBM" if memory >= ici else "ICI"
    return Roofline(
        seconds, bound, column.tokens / seconds, column.model_flops / (seconds * chip.peak_flops), compute, memory, ici
    )
