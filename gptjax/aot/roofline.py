"""A compiled program's counts for the whole call, and the roofline step time they bound.

The TPU compiler's cost analysis counts a loop body once. The train step's loop over
micro-batches holds nearly all of its work (the optimizer update after it is small), so its
HLO FLOPs and HBM bytes are the body's times grad_accum (`Column.repeats`); the tied head's
loop over sequence chunks stays counted once, so the compute bound takes the larger of the
HLO FLOPs and the model's 6N + attention FLOPs. The decode loop's figures are likewise one
decode step's. With `model.scan_layers` the blocks are one loop too, counted as one layer,
while the optimizer update and the embeddings outside it are counted whole; no factor
recovers the total, so the train and eval steps' HLO FLOPs, HBM bytes and roofline show as
n/a (memory and compile time are exact) unless `Column.unrolled` carries the figures of the
same step unrolled. A roofline is a bound, not a measurement: it leaves out collectives and
assumes perfect overlap.
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
    repeats: int = 1  # micro-batches per call: the compiler counts the loop over them once
    scanned: bool = False  # the blocks run as one scan (model.scan_layers): its body is counted once
    unrolled: tuple[float, float] | None = None  # a scanned step's (FLOPs, HBM bytes) per micro-batch, unrolled

    @property
    def counted(self) -> bool:
        """Whether the compiler's cost figures cover the whole call (not one layer of a scan)."""
        return not self.scanned or self.unrolled is not None

    @property
    def hlo_flops(self) -> float:
        """The compiler's FLOPs per chip for the whole call (its loop body times `repeats`)."""
        return (self.unrolled[0] if self.unrolled else self.compiled.flops) * self.repeats

    @property
    def hbm_bytes(self) -> float:
        """The compiler's HBM bytes per chip for the whole call (its loop body times `repeats`)."""
        return (self.unrolled[1] if self.unrolled else self.compiled.bytes_accessed) * self.repeats


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A call's bound step time, which bound it is, and the tokens/s and MFU it implies."""

    seconds: float
    bound: str  # 'compute' or 'HBM'
    tokens_per_s: float
    mfu: float


def roofline(column: Column, chip: Chip) -> Roofline:
    """Step time bound by peak FLOP/s and by HBM bandwidth, whichever is slower, per chip.

    The compute time uses the larger of the HLO and the model FLOPs (the compiler sees the
    head's chunk loop once); MFU is the model FLOPs over the bound's time at peak.
    """
    compute = max(column.hlo_flops, column.model_flops) / chip.peak_flops
    memory = column.hbm_bytes / chip.hbm_bytes_per_s
    seconds = max(compute, memory, 1e-12)
    return Roofline(
        seconds, "compute" if compute >= memory else "HBM", column.tokens / seconds, column.model_flops / (seconds * chip.peak_flops)
    )
