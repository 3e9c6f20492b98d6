"""The collectives of a compiled program and the bytes each chip sends over ICI for them.

An all-gather, reduce-scatter, all-reduce, all-to-all or collective-permute (also as an async
start) moves its operand between the chips of each replica group. Over a ring of n chips a
chip sends (n - 1) times its operand for an all-gather, (n - 1) / n of it for a reduce-scatter
or an all-to-all, twice that for an all-reduce (a reduce-scatter then an all-gather), and its
operand for a permute: the bytes the ICI bound of the roofline divides by the chip's links.
"""

from __future__ import annotations

import math
import re

from gptjax.aot.hlo import Computation, Instruction, Module, operand_bytes

COLLECTIVES = {"all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute"}


def _group_size(inst: Instruction, n_devices: int) -> int:
    """The chips in each of a collective's replica groups: listed ({{0,1,2,3},...}), as an iota
    ([groups,size]<=[n]) or as mesh axes (mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: their product)."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", inst.attrs)
    if mesh:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    groups = re.search(r"replica_groups=\{\{([^}]*)\}", inst.attrs)
    if groups:
        return len(groups.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", inst.attrs)
    if iota:
        return int(iota.group(2))
    return 2 if "source_target_pairs=" in inst.attrs else max(n_devices, 1)


def collective_kind(module: Module, inst: Instruction) -> str | None:
    """The collective an instruction starts ('all-gather', ...), or None."""
    op = inst.opcode
    if op.endswith("-start") and op[: -len("-start")] in COLLECTIVES:
        return op[: -len("-start")]
    if op in COLLECTIVES:
        return op
    if op == "async-start":
        called = module.computations.get(inst.attr("calls") or "")
        if called is not None and called.root.opcode in COLLECTIVES:
            return called.root.opcode
    return None


def ici_bytes(module: Module, comp: Computation, inst: Instruction, n_devices: int) -> float:
    """Bytes a chip sends over ICI for one collective (0 for anything else)."""
    kind = collective_kind(module, inst)
    if kind is None:
        return 0.0
    if inst.opcode == "async-start":
        inst_for_groups = module.computations[inst.attr("calls") or ""].root
    else:
        inst_for_groups = inst
    n = _group_size(inst_for_groups, n_devices)
    data = sum(operand_bytes(comp, inst, i) for i in range(len(inst.operands)))
    if n <= 1:
        return 0.0
    return data * {"all-gather": n - 1, "all-reduce": 2 * (n - 1) / n, "collective-permute": 1}.get(kind, (n - 1) / n)
