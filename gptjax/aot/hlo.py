"""The compiled program's HLO text, parsed: computations, instructions, and the bytes of a shape.

The TPU compiler's optimized module (`compiled.as_text()`) is the program as it runs: fusions,
custom-call kernels, collectives and while loops, each shape with its TPU layout. This module
reads that text into plain records; `gptjax.aot.counts` costs them. Only what the counts need
is parsed: an instruction's name, shape, opcode, operand names and the text of its attributes.

Sizes are the bytes a shape takes in memory: each array's two most minor dimensions (in its
layout's minor-to-major order) padded to the layout's first tile (`T(8,128)`: the second most
minor to a multiple of 8, the most minor to one of 128), as the TPU stores them. The compiler's
own cost analysis counts padded sizes too, which is why a tiny model's bytes exceed its
unpadded arrays.

Each array also says where it lives: the layout's memory space `S(n)` (none: 0). The TPU
compiler colours memory as Pallas's `tpu_custom_call.MemorySpace` does: 0 HBM, 1 VMEM (the
on-chip vector memory, 128 MiB on v5e, where the compiler's memory-space assignment keeps
operands and results between ops and prefetches into), 2 DMA semaphores, 4 SMEM; the compiled
modules also carry scalars in space 6. Only space 0 is HBM: `hbm_bytes` counts those arrays.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}
_ARRAY = re.compile(r"([a-z][a-z0-9_]*)\[([^\]]*)\](\{[^{}]*(?:\([^)]*\)[^{}]*)*\})?")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of a shape: element type, dimensions, and the layout's first tile (may be ())."""

    dtype: str
    dims: tuple[int, ...]
    minor_to_major: tuple[int, ...]
    tile: tuple[int, ...]
    memory_space: int = 0  # the layout's S(n): 0 is HBM; 1 VMEM and the others are on chip

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def itemsize(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 1 if self.dtype.startswith("f8") else 4)

    @property
    def padded_bytes(self) -> float:
        """Bytes in HBM: the minor dimensions padded to the tile."""
        dims = list(self.dims)
        order = self.minor_to_major or tuple(reversed(range(len(dims))))
        for tile, axis in zip(reversed(self.tile), order):
            dims[axis] = -(-dims[axis] // tile) * tile
        return math.prod(dims) * self.itemsize

    @property
    def hbm_bytes(self) -> float:
        """`padded_bytes` when the array lives in HBM (memory space 0), else 0."""
        return self.padded_bytes if self.memory_space == 0 else 0.0


def parse_shape(text: str) -> list[Array]:
    """The arrays of a shape's text (a tuple's, flattened, in order)."""
    arrays = []
    for m in _ARRAY.finditer(text):
        dtype, dims_text, layout = m.group(1), m.group(2), m.group(3) or ""
        if dtype not in DTYPE_BYTES and not dtype.startswith("f8"):
            continue
        dims = tuple(int(d.lstrip("<=")) for d in dims_text.split(",") if d.strip())
        order_text, _, tiles = layout.strip("{}").partition(":")
        order = tuple(int(d) for d in order_text.split(",") if d.strip().isdigit())
        tile_m = re.search(r"T\(([\d,]+)\)", tiles)
        tile = tuple(int(t) for t in tile_m.group(1).split(",")) if tile_m else ()
        space_m = re.search(r"S\((\d+)\)", tiles)
        arrays.append(Array(dtype, dims, order if len(order) == len(dims) else (), tile, int(space_m.group(1)) if space_m else 0))
    return arrays


def in_hbm(arrays: list[Array]) -> bool:
    """Whether any of `arrays` lives in HBM (memory space 0)."""
    return any(a.memory_space == 0 for a in arrays)


def shape_bytes(text: str, hbm_only: bool = False) -> float:
    """Bytes of a shape (all arrays of a tuple); `hbm_only`: of its arrays in HBM only."""
    return sum(a.hbm_bytes if hbm_only else a.padded_bytes for a in parse_shape(text))


@dataclasses.dataclass
class Instruction:
    """One HLO instruction: `%name = shape opcode(operands), attributes`."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    args: str = ""  # the text between the opcode's parentheses (a constant's value)

    def attr(self, key: str) -> str | None:
        """The value of a `key=value` attribute (a computation name, a number, a word), or None."""
        m = re.search(rf"(?:^|[ ,]){re.escape(key)}=%?([\w.\-]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def arrays(self) -> list[Array]:
        return parse_shape(self.shape)

    @property
    def bytes(self) -> float:
        return shape_bytes(self.shape)

    @property
    def hbm_bytes(self) -> float:
        """The bytes of its result that live in HBM."""
        return shape_bytes(self.shape, hbm_only=True)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: dict[str, Instruction]
    entry: bool = False

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions.values() if i.root)


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]

    @property
    def entry(self) -> Computation:
        return next(c for c in self.computations.values() if c.entry)


def operand_arrays(comp: Computation, inst: Instruction, i: int) -> list[Array]:
    """The arrays of an instruction's i-th operand (its defining instruction's shape)."""
    src = comp.instructions.get(inst.operands[i]) if i < len(inst.operands) else None
    return parse_shape(src.shape) if src is not None else []


def operand_bytes(comp: Computation, inst: Instruction, i: int, hbm_only: bool = False) -> float:
    """Bytes of an instruction's i-th operand; `hbm_only`: of its arrays in HBM only."""
    src = comp.instructions.get(inst.operands[i]) if i < len(inst.operands) else None
    return shape_bytes(src.shape, hbm_only) if src is not None else 0.0


_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_START = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = ")


def through_copies(comp: Computation, name: str) -> Instruction | None:
    """The instruction `name` stands for once copies, converts and bitcasts are looked through."""
    inst = comp.instructions.get(name)
    while inst is not None and inst.opcode in ("copy", "convert", "bitcast") and inst.operands:
        inst = comp.instructions.get(inst.operands[0])
    return inst


def _balanced(text: str, start: int) -> int:
    """The index just past the bracket group opening at text[start]."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    closers = set(pairs.values())
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in closers:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse_instruction(line: str) -> Instruction | None:
    """One instruction from its text (continuation lines joined), or None if it is not one."""
    m = _START.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)
    shape, rest = rest[:end], rest[end:].lstrip()
    op_m = re.match(r"([\w\-]+)\(", rest)
    if not op_m:
        return None
    close = _balanced(rest, op_m.end() - 1)
    args = rest[op_m.end():close - 1]
    operands = re.findall(r"%([\w.\-]+)", args)
    return Instruction(m.group(2), shape, op_m.group(1), operands, rest[close:].lstrip(", "), bool(m.group(1)), args)


def parse_module(text: str) -> Module:
    """The computations of an HLO module's text (`compiled.as_text()`)."""
    computations: dict[str, Computation] = {}
    current: Computation | None = None
    pending: list[str] = []

    def flush() -> None:
        if current is not None and pending:
            inst = parse_instruction(" ".join(pending))
            if inst is not None:
                current.instructions[inst.name] = inst
        pending.clear()

    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith(" "):
                current = Computation(m.group(2), {}, entry=bool(m.group(1)))
            continue
        if line.rstrip() == "}":
            flush()
            computations[current.name] = current
            current = None
        elif _START.match(line):
            flush()
            pending.append(line)
        elif pending:
            pending.append(line.strip())
    return Module(computations)
