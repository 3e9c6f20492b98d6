"""Custom-call kernels that XLA's cost analysis cannot see into, counted from their shapes.

A Pallas kernel is a `tpu_custom_call` to the compiler: its cost analysis charges it its
operands and outputs and no FLOPs. Three kinds appear in gptjax's programs and are counted here:
the splash attention kernels (`model.attention="splash"`: forward, dq and dkv, or forward and
the fused backward that computes dq too), from the block sizes the kernel records in its
metadata; the tied head's cross-entropy kernels (`model.head_loss`), likewise; and the TPU
compiler's own "online-softmax" kernel, which it makes of an einsum attention's softmax and
second matmul in forward-only programs.
"""

from __future__ import annotations

import json
import math
import re

from gptjax.aot.hlo import Array, Computation, Instruction, operand_arrays, operand_bytes
from gptjax.model.head_kernel import KERNEL_TAG as HEAD_CE_TAG


def _causal_pairs(seq_q: int, seq_kv: int, block_q: int, block_kv: int) -> int:
    """(query block, key block) pairs with any key at or before a query: those a causal kernel computes."""
    n_kv = -(-seq_kv // block_kv)
    return sum(min(n_kv, ((i + 1) * block_q - 1) // block_kv + 1) for i in range(-(-seq_q // block_q)))


def _fused_backward(inst: Instruction, q: Array) -> bool:
    """Whether a splash dkv kernel is the fused backward (`use_fused_bwd_kernel`), which also
    computes dq: among its outputs is dq as one partial per key block, an array of q's dtype
    with one more axis than q (the key blocks', before the heads) and q's [heads, tokens,
    head_dim]. (Its metadata does not say: the dkv kernel records only its own blocks.)"""
    return any(a.dtype == q.dtype and len(a.dims) == len(q.dims) + 1 and a.dims[-3:] == q.dims[-3:]
               for a in inst.arrays)


def splash_cost(comp: Computation, inst: Instruction) -> tuple[float, float] | None:
    """(FLOPs, HBM bytes) of a splash attention kernel from its block sizes, or None when
    `inst` is not one. Its first three floating operands of rank >= 3 are q, k, v
    ([..., tokens, head_dim]); the kernel is causal (gptjax's splash kernel is)."""
    meta = re.search(r'"xprof_metadata":"(\{.*?\})"', inst.attrs)
    if inst.opcode != "custom-call" or not meta or "block_q" not in meta.group(1):
        return None
    blocks = json.loads(meta.group(1).replace('\\"', '"'))
    arrays = [a for i in range(len(inst.operands)) for a in operand_arrays(comp, inst, i)]
    q, k, v = ([a for a in arrays if len(a.dims) >= 3 and a.dtype in ("f32", "bf16", "f16")] + [None] * 3)[:3]
    if q is None or k is None or v is None:
        return None
    rows, seq_q, d, seq_kv, size = math.prod(q.dims[:-2]), q.dims[-2], q.dims[-1], k.dims[-2], q.itemsize
    name = inst.name
    if "dkv" in name:
        bq, bkv, per_pair = blocks["block_q_dkv"], blocks["block_kv_dkv"], 10 if _fused_backward(inst, q) else 8
    elif "dq" in name:
        bq, bkv, per_pair = blocks["block_q_dq"], blocks["block_kv_dq"], 6
    else:
        bq, bkv, per_pair = blocks["block_q"], blocks["block_kv"], 4
    pairs = _causal_pairs(seq_q, seq_kv, bq, bkv)
    flops = rows * pairs * per_pair * bq * bkv * d
    if "dkv" in name:  # k, v once per key block; q and d(out) per pair
        moved = rows * size * (2 * seq_kv * d + pairs * 2 * bq * d)
    else:  # q (and d(out)) once per query block; k and v per pair
        moved = rows * size * ((1 if "fwd" in name else 2) * seq_q * d + pairs * 2 * bkv * d)
    if q.memory_space or k.memory_space:  # operands the compiler placed in VMEM: their blocks move no HBM bytes
        moved = 0
    return float(flops), float(moved + inst.hbm_bytes)


def head_ce_cost(comp: Computation, inst: Instruction) -> tuple[float, float] | None:
    """(FLOPs, HBM bytes) of a head cross-entropy kernel (`gptjax.model.head_kernel`) from the
    sizes in its metadata, or None when `inst` is not one. Grid (token block i, vocabulary
    block j), j innermost: a block is fetched whenever its block index changes, so the table's
    blocks once per token block when there are several vocabulary blocks, else once; the
    token-side blocks once; the backward writes each token block's fp32 d table partial (the
    partials' sum is XLA's, counted as such). FLOPs:
    the matmuls over the whole grid (the forward's logits; the backward's logits again, d
    hidden and d table)."""
    meta = re.search(r'"xprof_metadata":"(\{.*?\})"', inst.attrs)
    if inst.opcode != "custom-call" or not meta or HEAD_CE_TAG not in meta.group(1):
        return None
    m = json.loads(meta.group(1).replace('\\"', '"'))
    n, c, s, tm, tv = m["tokens"], m["embed"], m["itemsize"], m["block_tokens"], m["block_vocab"]
    nv = -(-m["valid"] // tv)
    sweeps = n // tm if nv > 1 else 1  # passes over the table's blocks
    rows = min(nv * tv, m["rows"])  # the table rows the grid reads (its tail past the table is not fetched)
    if m["pass_"] == "fwd":  # hidden and targets in; loss and logsumexp out
        flops, moved = 2 * n * nv * tv * c, n * c * s + 3 * n * 4 + sweeps * rows * c * s
    else:  # targets, d(loss), logsumexp and hidden in, d hidden out; the table in, d table's partials out
        flops, moved = 6 * n * nv * tv * c, 3 * n * 4 + 2 * n * c * s + sweeps * rows * c * s + n // tm * rows * c * 4
    return float(flops), float(moved)


def online_softmax_cost(comp: Computation, inst: Instruction) -> tuple[float, float] | None:
    """(FLOPs, HBM bytes) of the TPU compiler's own "online-softmax" kernel, or None when `inst`
    is not one: softmax(scores [..., T, S]) @ v [..., S, D], which it makes of an einsum
    attention's softmax and second matmul. FLOPs: the matmul's 2 T S D and 4 per score (max,
    subtract, sum, scale); bytes: its operands and output, each once."""
    if inst.opcode != "custom-call" or 'op_name="online-softmax"' not in inst.attrs or len(inst.operands) != 2:
        return None
    scores, v = (operand_arrays(comp, inst, i) for i in range(2))
    if len(scores) != 1 or len(v) != 1 or len(scores[0].dims) < 2:
        return None
    s = scores[0]
    moved = sum(operand_bytes(comp, inst, i, hbm_only=True) for i in range(len(inst.operands))) + inst.hbm_bytes
    return float(s.elements * (2 * v[0].dims[-1] + 4)), moved


def kernel_cost(comp: Computation, inst: Instruction) -> tuple[float, float] | None:
    """(FLOPs, HBM bytes) of a custom-call kernel the counts know (splash, head cross entropy,
    online-softmax)."""
    return splash_cost(comp, inst) or head_ce_cost(comp, inst) or online_softmax_cost(comp, inst)
