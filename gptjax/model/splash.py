"""The Pallas splash kernel for a full pass's attention (`model.attention="splash"`).

`splash_attention` computes causal attention with JAX's Pallas splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`): on a TPU the Mosaic-compiled kernel,
which never holds a [T, T] score matrix and skips the key blocks above the diagonal; on a
CPU the same kernel code in Pallas interpret mode (slow, for tests and the reference
comparison). A GPU has no splash kernel: there `model.attention="dot_product"` is cuDNN's.

Under a mesh (`jax.set_mesh`, as the train and eval steps run) the kernel runs per shard in
`jax.shard_map`: batch split as the logical axis `batch` is, heads as `heads` (the rules of
`gptjax.sharding`), the sequence and head_dim whole on every shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from gptjax import sharding
from gptjax.errors import UserError
from gptjax.model.platform import trace_platform

LANES = 128  # the kernel's blocks are multiples of this many tokens
MAX_BLOCK = 1024  # the largest query / key block tried (a block divides the padded sequence)
FORWARD_BLOCK = 512  # ... in the forward kernel
COMPUTE_BLOCK = 512  # the most keys of a block one step of a kernel computes scores for
PAD_SEGMENT = -1  # the segment id of padding tokens (token_mask False, or the sequence's tail)


def splash_attention(q_BxHxTxD: jax.Array, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None,
                     segment_ids: jax.Array | None, q_scaled: bool = False) -> jax.Array:
    """Causal attention by the splash kernel: [B, H, T, D] in (the compute dtype), [B, H, T, D] out.

    A query sees the keys at or before it; with segment_ids [B, T] only those of its own
    segment; with token_mask [B, T] only real keys (padding becomes its own segment, so a real
    token's output equals the reference's under `gptjax.model.attention.attention_mask`; a
    padded query's output is not meaningful, in the reference either). A sequence that is not
    a multiple of 128 tokens is padded at its end, which no real query sees under the causal
    mask.
    """
    mesh = jax.sharding.get_abstract_mesh()
    platform = trace_platform()
    if platform == "gpu":
        raise UserError("model.attention='splash' is a TPU kernel; on a GPU use model.attention='dot_product' (cuDNN)")
    b, h, t, d = q_BxHxTxD.shape
    seq = -(-t // LANES) * LANES
    ids_BxT = None
    if segment_ids is not None or token_mask is not None or seq != t:
        ids_BxT = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        if token_mask is not None:
            ids_BxT = jnp.where(token_mask, ids_BxT, PAD_SEGMENT)
        ids_BxT = jnp.pad(ids_BxT, ((0, 0), (0, seq - t)), constant_values=PAD_SEGMENT)
    # The kernel does not scale its scores: scale q (in fp32, then back to its dtype).
    # (`q_scaled`: the caller has, `gptjax.model.attention.folded_q_scale`.)
    if not q_scaled:
        q_BxHxTxD = (q_BxHxTxD.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q_BxHxTxD.dtype)
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, seq - t), (0, 0))) for x in (q_BxHxTxD, k_BxHxTxD, v_BxHxTxD))
    interpret = platform != "tpu"

    def attend(q_BxHxSxD: jax.Array, k_BxHxSxD: jax.Array, v_BxHxSxD: jax.Array, ids: jax.Array | None) -> jax.Array:
        kernel = _kernel(q_BxHxSxD.shape[1], seq, interpret)
        if ids is None:
            return jax.vmap(kernel)(q_BxHxSxD, k_BxHxSxD, v_BxHxSxD)
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(s1, s1)))(
            q_BxHxSxD, k_BxHxSxD, v_BxHxSxD, ids
        )

    if not mesh.empty:
        batch = sharding.activation_mesh_axes(mesh, "batch")
        heads = sharding.activation_mesh_axes(mesh, "heads")
        qkv_spec, ids_spec = P(batch, heads, None, None), P(batch, None)
        in_specs = (qkv_spec, qkv_spec, qkv_spec, None if ids_BxT is None else ids_spec)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)
    return attend(q, k, v, ids_BxT)[:, :, :t]


def block_size(seq: int, largest: int = MAX_BLOCK) -> int:
    """The largest multiple of 128 up to `largest` that divides the (padded) sequence length:
    with `MAX_BLOCK`, the query and key block of every kernel (forward and backward)."""
    return max(bs for bs in range(LANES, min(largest, seq) + 1, LANES) if seq % bs == 0)


def block_sizes(seq: int) -> splash.BlockSizes:
    """The kernels' blocks for a (padded) sequence of `seq` tokens.

    The forward in query and key blocks of up to `FORWARD_BLOCK` tokens: it skips the blocks
    above the diagonal (a quarter of the square in 512-token blocks at T = 1,024). The backward
    in blocks of up to `MAX_BLOCK` (the whole 1,024-token sequence of the GPT-2 recipes), its key
    block computed `COMPUTE_BLOCK` keys at a time (the [query block, compute block] fp32 scores
    held on chip), as one fused kernel for dq, dk and dv: it reads q, k, v, the output's
    gradient and the residuals once instead of once per backward kernel, and its dq is summed
    over key blocks afterwards, one partial per key block (none to sum at one key block). On
    v5e:2x2 the 124M recipe's step moves fewer HBM bytes and does fewer FLOPs than with
    512-token blocks and separate dq and dkv kernels (docs/tpu.md).
    """
    fwd, bwd = block_size(seq, FORWARD_BLOCK), block_size(seq)
    return splash.BlockSizes(
        block_q=fwd, block_kv=fwd, block_kv_compute=block_size(fwd, COMPUTE_BLOCK),
        block_q_dkv=bwd, block_kv_dkv=bwd, block_kv_dkv_compute=block_size(bwd, COMPUTE_BLOCK),
        use_fused_bwd_kernel=True,
    )


def _kernel(heads: int, seq: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The causal multi-head splash kernel over [heads, seq, head_dim] (one example, one shard)."""
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
    return splash.make_splash_mha(mask, block_sizes=block_sizes(seq), head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
