"""The largest micro-batch whose train step fits: the candidates, and a search that compiles few."""

from __future__ import annotations

from typing import Callable, Sequence

from gptjax.aot.compile import Compiled


def micro_batches(batch_size: int, data_parallel: int) -> list[int]:
    """Micro-batches a step of `batch_size` sequences splits into (batch_size / grad_accum,
    divisible by the data-parallel size), largest first."""
    return [batch_size // a for a in range(1, batch_size + 1) if batch_size % a == 0 and (batch_size // a) % data_parallel == 0]


def largest_fitting(
    candidates: Sequence[int], refused: dict[int, Compiled], fixed: int, compile_at: Callable[[int], Compiled]
) -> tuple[int, Compiled] | None:
    """The largest candidate micro-batch whose train step fits (`Compiled.fits`), or None.

    `refused` maps micro-batches already refused to their refusals; `fixed` is the
    part of a step's memory that does not grow with the micro-batch (its state). Each probe is
    the largest untried candidate that a straight line through the nearest known points says
    fits; the search ends when the best accepted candidate and the smallest refused one are
    neighbours, so the answer does not depend on the line being right.
    """
    bad = {m: c.total for m, c in refused.items()}
    limit = min(c.limit for c in refused.values())
    good: dict[int, Compiled] = {}
    while True:
        hi = min(bad)
        lo = max(good) if good else 0
        untried = [m for m in candidates if lo < m < hi]
        if not untried:
            break
        base_m, base_bytes = (lo, good[lo].total) if good else (0, fixed)
        slope = max(bad[hi] - base_bytes, 1) / (hi - base_m)
        guess = base_m + (limit - base_bytes) / slope
        fitting = [m for m in untried if m <= guess]
        probe = max(fitting) if fitting else min(untried)
        result = compile_at(probe)
        if result.fits:
            good[probe] = result
        else:
            bad[probe] = result.total
    if not good:
        return None
    best = max(good)
    return best, good[best]
