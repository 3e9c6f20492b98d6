"""A compiled step's FLOPs, HBM bytes and ICI bytes per chip, counting every loop iteration.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once and a
custom-call kernel as its operands and outputs: the micro-batch loop (train.grad_accum), the
tied head's loop over sequence chunks and the layer scan (model.scan_layers) each count as one
iteration, and splash attention's matmuls not at all. `count` corrects that from the compiled
module itself (`gptjax.aot.hlo`), in one pass and without more compiles:

1. Each computation's multiplicity: the entry runs once; a while loop's body runs its trip
   count times per run of the computation holding it (nested loops multiply). The trip count is
   read from the loop: its condition compares an induction variable with a constant, the loop
   starts it at a constant and its body adds a constant (XLA's `known_trip_count`, when the
   module carries it, wins). A loop whose count cannot be read counts once, as XLA's does, and
   `Counts.unknown_loops` says how many there were.
2. Each top-level instruction's cost: FLOPs as XLA counts them (its dots, convolutions,
   elementwise ops and reductions: within 1% of XLA's total on the steps tested); HBM bytes as
   the chip moves them: its operands and outputs at their padded TPU sizes that live in HBM
   (memory space 0 in their layouts: what the compiler keeps in VMEM, `S(1)`, moves no HBM
   bytes), an asynchronous copy or slice between memory spaces its HBM side once, a bitcast
   nothing, a fusion only the slices it reads of an operand it slices and the update it writes
   in place. (`instruction_bytes(physical=False)` is the compiler's own rule, every operand and
   result wherever it lives and a fusion's whole buffers, which in a loop walking a stacked
   array multiplies the stack by its depth: within 3% of XLA's total where nothing loops.) A
   kernel the cost analysis cannot see into is counted from its shapes (`gptjax.aot.kernels`:
   splash attention and the head's cross entropy from their block sizes, the compiler's
   online-softmax).
3. The totals: FLOPs are XLA's own count plus every instruction's FLOPs times (multiplicity -
   1) plus each kernel's own work (exactly XLA's where nothing loops and no kernel runs); HBM
   bytes are every instruction's HBM bytes times its multiplicity (XLA's byte count mixes
   memory spaces: kept only as `Counts.xla_bytes`). Work inside a fusion (a matmul re-reading
   an operand tile by tile) is not in the HLO and not counted.

The collectives (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, also
as async starts) give the ICI bytes a chip sends in a ring over a replica group of n chips:
all-gather (n - 1) x its operand, reduce-scatter (n - 1) / n of it, all-reduce twice that;
times the multiplicity of the computation holding it.
"""

from __future__ import annotations

import dataclasses
import math
import re

from gptjax.aot.collectives import collective_kind, ici_bytes
from gptjax.aot.hlo import (Computation, Instruction, Module, in_hbm, operand_arrays, operand_bytes, parse_module,
                            shape_bytes, through_copies)
from gptjax.aot.kernels import kernel_cost

# Instructions that move no data of their own (aliases, tuples, control).
_FREE = {
    "parameter", "get-tuple-element", "tuple", "constant", "after-all", "partition-id", "replica-id",
    "opt-barrier", "while", "call", "conditional", "domain", "add-dependency",
}
_DONE = {"all-gather-done", "all-reduce-done", "collective-permute-done", "async-done", "async-update", "send-done",
         "recv-done"}
_ASYNC_DONE = {"copy-done", "slice-done"}  # physically: an asynchronous copy or slice's data moves in its start
_ELEMENTWISE = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare", "select", "clamp",
    "and", "or", "xor", "not", "sign", "floor", "ceil", "round-nearest-even", "round-nearest-afz", "remainder",
    "is-finite", "convert", "shift-left", "shift-right-logical", "shift-right-arithmetic", "reduce-precision",
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One instruction's share of the call: its cost summed over the times it runs."""

    name: str  # the instruction's name in the compiled module
    kind: str  # 'fusion', 'kernel', 'collective' or the opcode
    what: str  # where it comes from in the program (the tail of its op_name metadata)
    times: int  # how many times it runs per call
    flops: float
    hbm_bytes: float
    ici_bytes: float


@dataclasses.dataclass(frozen=True)
class Counts:
    """Per-chip totals for one call of a compiled program, every loop iteration counted."""

    flops: float
    hbm_bytes: float
    ici_bytes: float
    xla_flops: float  # the compiler's own cost analysis (loop bodies once, kernels as data)
    xla_bytes: float
    ops: tuple[Op, ...]  # every costed instruction
    loops: tuple[tuple[str, int], ...]  # (while instruction, trip count) of each loop read
    unknown_loops: int = 0  # loops whose trip count could not be read (counted once)

    def top(self, n: int, key: str) -> list[tuple[Op, float]]:
        """The `n` ops with the most `key` ('flops', 'hbm_bytes' or 'ici_bytes'), with their
        share of the sum of that over all ops."""
        total = sum(getattr(o, key) for o in self.ops) or 1.0
        ranked = sorted((o for o in self.ops if getattr(o, key) > 0), key=lambda o: -getattr(o, key))
        return [(o, getattr(o, key) / total) for o in ranked[:n]]


# -- trip counts -----------------------------------------------------------------------------


def _const(comp: Computation, name: str) -> int | None:
    inst = through_copies(comp, name)
    if inst is None or inst.opcode != "constant":
        return None
    try:
        return int(inst.args.strip())
    except ValueError:
        return None


def _tuple_index(comp: Computation, name: str) -> int | None:
    """k when `name` is get-tuple-element(parameter, index=k)."""
    inst = through_copies(comp, name)
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    src = comp.instructions.get(inst.operands[0]) if inst.operands else None
    index = inst.attr("index")
    return int(index) if src is not None and src.opcode == "parameter" and index is not None else None


def trip_count(module: Module, parent: Computation, loop: Instruction) -> int | None:
    """How many times `loop` (a while in `parent`) runs its body, or None when not readable."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    cond = module.computations.get(loop.attr("condition") or "")
    body = module.computations.get(loop.attr("body") or "")
    if cond is None or body is None:
        return None
    root = cond.root
    if root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = root.attr("direction")
    a, b = root.operands
    k, limit = _tuple_index(cond, a), _const(cond, b)
    if k is None or limit is None:
        k, limit = _tuple_index(cond, b), _const(cond, a)
        direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction or "", direction)
    if k is None or limit is None:
        return None
    init_tuple = parent.instructions.get(loop.operands[0]) if loop.operands else None
    start = _const(parent, init_tuple.operands[k]) if init_tuple is not None and init_tuple.opcode == "tuple" else None
    step = None
    body_root = body.root
    if body_root.opcode == "tuple" and k < len(body_root.operands):
        inc = body.instructions.get(body_root.operands[k])
        if inc is not None and inc.opcode == "add" and len(inc.operands) == 2:
            x, y = inc.operands
            if _tuple_index(body, x) == k:
                step = _const(body, y)
            elif _tuple_index(body, y) == k:
                step = _const(body, x)
    if start is None or not step:
        return None
    if direction == "LT":
        return max(0, -(-(limit - start) // step))
    if direction == "LE":
        return max(0, (limit - start) // step + 1)
    if direction == "GT":
        return max(0, -(-(start - limit) // -step))
    if direction == "GE":
        return max(0, (start - limit) // -step + 1)
    return None


def multiplicities(module: Module) -> tuple[dict[str, int], list[tuple[str, int]], int]:
    """How many times each (non-fused) computation runs per call; the loops read; and how many
    loops' trip counts could not be read. An async start's wrapped computation is not visited:
    the start itself is costed (and, for a collective, its ICI bytes)."""
    times: dict[str, int] = {}
    loops: list[tuple[str, int]] = []
    unknown = 0

    def visit(comp: Computation, m: int) -> None:
        nonlocal unknown
        times[comp.name] = times.get(comp.name, 0) + m
        for inst in comp.instructions.values():
            if inst.opcode == "while":
                n = trip_count(module, comp, inst)
                if n is None:
                    unknown += 1
                else:
                    loops.append((inst.name, n))
                for key, factor in (("body", n if n is not None else 1), ("condition", 1)):
                    sub = module.computations.get(inst.attr(key) or "")
                    if sub is not None:
                        visit(sub, m * factor)
            elif inst.opcode in ("call", "conditional"):  # every branch, as if each ran: a bound
                branches = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
                names = re.findall(r"(?:to_apply|true_computation|false_computation)=%([\w.\-]+)", inst.attrs)
                for name in names + (re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []):
                    if name in module.computations:
                        visit(module.computations[name], m)

    visit(module.entry, 1)
    return times, loops, unknown


# -- one instruction's cost ------------------------------------------------------------------


def _window_taps(in_size: int, out_size: int, size: int, stride: int, pad_low: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Window taps over all output positions of one spatial dimension that land on an input
    element (not padding, not a hole of the input's dilation), as XLA counts a convolution."""
    dilated = (in_size - 1) * lhs_dilate + 1
    taps = 0
    for o in range(out_size):
        for k in range(size):
            i = o * stride + k * rhs_dilate - pad_low
            taps += 0 <= i < dilated and i % lhs_dilate == 0
    return taps


def _convolution_flops(comp: Computation, inst: Instruction, out: int) -> float:
    """2 x (output elements over output positions) x input features per group x valid taps:
    the TPU compiler writes batched matmuls as convolutions with dilated windows."""
    lhs = operand_arrays(comp, inst, 0)
    labels = re.search(r"dim_labels=(\w+)_\w+->(\w+)", inst.attrs)
    if not lhs or not labels or "f" not in labels.group(1):
        return 0.0
    lhs_labels, out_labels = labels.group(1), labels.group(2)
    features = lhs[0].dims[lhs_labels.index("f")] / int(inst.attr("feature_group_count") or 1)
    out_dims = inst.arrays[0].dims
    spatial = sorted(c for c in lhs_labels if c.isdigit())
    window = dict(re.findall(r"(\w+)=([\d_x]+)", (re.search(r"window=\{([^}]*)\}", inst.attrs) or [None, ""])[1]))
    per_dim = lambda key, default: [int(v.split("_")[0]) for v in window[key].split("x")] if key in window else [default] * len(spatial)
    sizes, strides, pads = per_dim("size", 1), per_dim("stride", 1), per_dim("pad", 0)
    lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    positions, taps = 1, 1
    for d, label in enumerate(spatial):
        in_size, out_size = lhs[0].dims[lhs_labels.index(label)], out_dims[out_labels.index(label)]
        positions *= out_size
        taps *= _window_taps(in_size, out_size, sizes[d], strides[d], pads[d], lhs_dil[d], rhs_dil[d])
    return 2.0 * out / max(positions, 1) * features * taps


def instruction_flops(module: Module, comp: Computation, inst: Instruction) -> float:
    """FLOPs of one instruction as XLA counts them (a fusion: those of the ops it fuses)."""
    op = inst.opcode
    if op == "fusion":
        fused = module.computations.get(inst.attr("calls") or "")
        return sum(instruction_flops(module, fused, i) for i in fused.instructions.values()) if fused else 0.0
    out = sum(a.elements for a in inst.arrays)
    if op == "dot":
        lhs = operand_arrays(comp, inst, 0)
        dims = [int(d) for d in re.findall(r"\d+", (re.search(r"lhs_contracting_dims=\{([^}]*)\}", inst.attrs) or [None, ""])[1])]
        return 2.0 * out * math.prod(lhs[0].dims[d] for d in dims) if lhs else 0.0
    if op == "convolution":
        return _convolution_flops(comp, inst, out)
    if op in _ELEMENTWISE:
        return float(out)
    if op in ("reduce", "reduce-window"):
        ins = sum(a.elements for a in operand_arrays(comp, inst, 0))
        return float(max(ins - out, 0))
    return 0.0


def _params(fused: Computation) -> dict[int, Instruction]:
    return {int(i.args): i for i in fused.instructions.values() if i.opcode == "parameter" and i.args.strip().isdigit()}


def _users(fused: Computation) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for i in fused.instructions.values():
        for o in i.operands:
            users.setdefault(o, []).append(i)
    return users


def _sliced_read(module: Module, fused: Computation, param: Instruction) -> float | None:
    """The bytes a fusion reads of a parameter it only slices (directly or in a fusion nested
    in it), or None when it reads more than slices of it."""
    total = 0.0
    uses = _users(fused).get(param.name, [])
    if not uses:
        return None
    for u in uses:
        if u.opcode in ("slice", "dynamic-slice") and u.operands[0] == param.name:
            total += u.bytes
        elif u.opcode == "fusion" and u.operands.count(param.name) == 1:
            inner = module.computations.get(u.attr("calls") or "")
            inner_param = _params(inner).get(u.operands.index(param.name)) if inner is not None else None
            read = _sliced_read(module, inner, inner_param) if inner_param is not None else None
            if read is None:
                return None
            total += read
        else:
            return None
    return total


def _async_start_bytes(comp: Computation, inst: Instruction) -> float:
    """HBM bytes of an asynchronous start (copy-start, slice-start, a collective's start),
    whose tuple holds its operands' aliases, its results and context scalars: each operand in
    HBM read once (a slice-start's: only its slice), each result in HBM written once."""
    results = list(inst.arrays)
    operands = [a for i in range(len(inst.operands)) for a in operand_arrays(comp, inst, i)]
    for a in operands:  # the operands' aliases in the tuple
        same = next((r for r in results if (r.dtype, r.dims, r.memory_space) == (a.dtype, a.dims, a.memory_space)), None)
        if same is not None:
            results.remove(same)
    written = sum(r.hbm_bytes for r in results)
    if inst.opcode == "slice-start":
        return written + (sum(r.padded_bytes for r in results if r.dims) if in_hbm(operands) else 0.0)
    return written + sum(a.hbm_bytes for a in operands)


def instruction_bytes(module: Module, comp: Computation, inst: Instruction, physical: bool = True) -> float:
    """Bytes one top-level instruction reads and writes: its operands and outputs at their
    padded sizes. `physical`: its HBM traffic: only arrays in HBM (memory space 0; what the
    compiler keeps in VMEM moves no HBM bytes), an asynchronous copy or slice its HBM side
    once, a bitcast nothing, a fusion's operand that it only slices the slices it reads, an
    in-place dynamic-update-slice the update it writes. Else as the TPU compiler's own cost
    analysis charges it, whatever the memory space: a bitcast its operand and output, a fusion
    its whole operands and outputs (in a loop that walks a stacked array, that overcounts by
    the stack's depth)."""
    op = inst.opcode
    if op in _FREE or op in _DONE or (op == "custom-call" and 'custom_call_target="AllocateBuffer"' in inst.attrs):
        return 0.0
    if physical and (op == "bitcast" or op in _ASYNC_DONE):
        return 0.0
    if op == "copy-done":  # the copy's destination, read and written (its operand is the start's tuple)
        return 2 * inst.bytes
    if physical and op.endswith("-start"):
        return _async_start_bytes(comp, inst)
    whole = sum(operand_bytes(comp, inst, i, physical) for i in range(len(inst.operands))) + shape_bytes(inst.shape, physical)
    fused = module.computations.get(inst.attr("calls") or "") if op == "fusion" else None
    if not physical or fused is None:
        return whole
    params = _params(fused)
    users = _users(fused)
    root = fused.root
    outs = [fused.instructions[o] for o in root.operands if o in fused.instructions] if root.opcode == "tuple" else [root]
    out_arrays = inst.arrays
    in_place = {u.operands[0] for u in outs if u.opcode == "dynamic-update-slice" and u.operands}
    total = 0.0
    for index in range(len(inst.operands)):
        if not in_hbm(operand_arrays(comp, inst, index)):
            continue  # kept on chip: read from VMEM
        p = params.get(index)
        if p is not None and p.name in in_place and len(users.get(p.name, [])) == 1:
            continue  # the buffer updated in place: only the update moves (counted below)
        read = _sliced_read(module, fused, p) if p is not None else None
        total += operand_bytes(comp, inst, index, True) if read is None else read
    for k, out in enumerate(outs):
        if k < len(out_arrays) and out_arrays[k].memory_space != 0:
            continue  # written to VMEM
        update = fused.instructions.get(out.operands[1]) if out.opcode == "dynamic-update-slice" else None
        if update is not None and len(users.get(out.operands[0], [])) == 1 and out.operands[0] in {p.name for p in params.values()}:
            total += update.bytes
        else:
            total += out.bytes
    return total


# -- the whole call --------------------------------------------------------------------------


def _what(inst: Instruction) -> str:
    m = re.search(r'op_name="([^"]*)"', inst.attrs)
    if not m:
        return ""
    parts = [p for p in m.group(1).split("/") if p and not p.startswith(("jit(", "jvp(", "transpose(", "closed_call", "while", "body"))]
    return "/".join(parts[-3:])


def count(text: str, xla_flops: float, xla_bytes: float, n_devices: int = 0) -> Counts:
    """The counts of a compiled program from its HLO text (`compiled.as_text()`) and its XLA
    cost analysis totals (see the module's docstring). `n_devices` (0: the module's
    num_partitions) is the group of a collective whose replica groups the text does not give."""
    module = parse_module(text)
    if not n_devices:
        partitions = re.search(r"num_partitions=(\d+)", text[:20000])
        n_devices = int(partitions.group(1)) if partitions else 1
    times, loops, unknown = multiplicities(module)
    flops, hbm = xla_flops, 0.0
    ops: list[Op] = []
    for name, m in times.items():
        comp = module.computations[name]
        for inst in comp.instructions.values():
            f, b = instruction_flops(module, comp, inst), instruction_bytes(module, comp, inst)
            kernel = kernel_cost(comp, inst)
            if kernel is not None:  # its own work in place of XLA's (no FLOPs, its operands and outputs once)
                flops += m * kernel[0]
                f, b = kernel
            else:  # the iterations XLA did not count
                flops += (m - 1) * f
            hbm += m * b
            ici = ici_bytes(module, comp, inst, n_devices)
            if f or b or ici:
                kind = "kernel" if inst.opcode == "custom-call" else "collective" if collective_kind(module, inst) else inst.opcode
                ops.append(Op(inst.name, kind, _what(inst), m, m * f, m * b, m * ici))
    return Counts(flops, hbm, sum(o.ici_bytes for o in ops), xla_flops, xla_bytes, tuple(ops), tuple(loops), unknown)
