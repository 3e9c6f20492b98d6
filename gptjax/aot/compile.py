"""Compiling a lowered program for TPU and reading what the compiler says about it.

`compile_lowered` turns the compiler's answer into a `Compiled`: per-chip memory
(`memory_analysis`), the compiler's cost (`cost_analysis`, loop bodies counted once) and the
counts of the whole call (`gptjax.aot.counts`: every loop iteration, kernels, collectives)
when it compiled, or the bytes it needed and had when it refused the program for want of HBM
(`parse_oom`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax

from gptjax.aot.counts import Counts, count


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the TPU compiler says about one program, per chip. `total` is its peak HBM use.

    It fits when the compiler accepted it and its total is within the chip's HBM (`hbm`, 0 when
    not known): the compiler's own limit is on part of that total, so acceptance alone is not
    enough (it accepts programs whose arguments and temporaries together exceed the chip).
    """

    name: str
    seconds: float
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    oom_used: int | None = None  # the compiler refused it: bytes it needed
    oom_limit: int | None = None  # ... of this many it could use
    hbm: int = 0  # the chip's HBM bytes
    counts: Counts | None = dataclasses.field(default=None, compare=False, repr=False)  # every loop iteration
    executable: Any = dataclasses.field(default=None, compare=False, repr=False)  # when it compiled

    @property
    def total(self) -> int:
        if self.oom_used is not None:
            return self.oom_used
        return self.argument + self.output - self.alias + self.temp + self.code

    @property
    def refused(self) -> bool:
        return self.oom_used is not None

    @property
    def fits(self) -> bool:
        return not self.refused and (not self.hbm or self.total <= self.hbm)

    @property
    def limit(self) -> int:
        """The bytes a fitting program may use: the compiler's figure when it refused, else HBM."""
        return self.oom_limit or self.hbm or self.total


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_oom(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the TPU compiler's out-of-HBM refusal, else None.

    libtpu words it "... required for HLO temporaries (20.00G) exceeds available HBM (15.75G)"
    or "Used 20.00G of 15.75G hbm"; sizes are binary (G = GiB).
    """
    size = r"([\d.]+[KMGT]?)i?B?"
    for pattern in (rf"required for [^()]*\({size}\) exceeds available HBM \({size}\)", rf"Used {size} of {size} hbm"):
        m = re.search(pattern, message)
        if m:
            return _parse_size(m.group(1)), _parse_size(m.group(2))
    return None


def compile_lowered(name: str, lowered: jax.stages.Lowered, hbm: int = 0) -> Compiled:
    """Compile for the lowered program's devices (chips of `hbm` bytes); an out-of-HBM refusal
    becomes a result."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        return Compiled(name, time.perf_counter() - start, oom_used=oom[0], oom_limit=oom[1], hbm=hbm)
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return Compiled(
        name,
        seconds,
        argument=mem.argument_size_in_bytes,
        output=mem.output_size_in_bytes,
        alias=mem.alias_size_in_bytes,
        temp=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        flops=flops,
        bytes_accessed=bytes_accessed,
        hbm=hbm,
        counts=count(compiled.as_text(), flops, bytes_accessed),
        executable=compiled,
    )
