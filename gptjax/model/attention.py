"""Causal multi-head self-attention, and its implementations by name (`model.attention`).

A full pass (training, evaluation, `decode=False`) computes attention with the implementation
`IMPLEMENTATIONS[cfg.attention]` names:

    "xla"          einsums and a softmax, with attention dropout: the reference
    "dot_product"  `jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU
    "splash"       the Pallas splash kernel (`gptjax.model.splash`): TPU; interpreted on a CPU
    "auto"         the platform's fast one of these (`gptjax.model.platform.resolve_attention`)

Each takes q [B, H, T, D] and k, v [B, K, T, D] in the compute dtype (K key/value heads,
`model.n_kv_head`: query head h reads key/value head h // (H / K), grouped-query attention
when K < H, multi-query when K = 1), the token mask and segment ids, and the dropout to apply
to the attention probabilities (only the reference has them; the config refuses
model.dropout > 0 with the others), and gives [B, H, T, D]. Decoding (`decode=True`) always
uses the einsums, over the key/value cache that `CausalSelfAttention` keeps: it holds only the
K key/value heads, so its memory and the bytes each decode step reads fall by H / K.

Queries and keys may be normalised per head (`model.qk_norm`, an RMSNorm over head_dim) and
rotated by their positions (`model.position="rope"`, `gptjax.model.rope`) before attention
and before the keys enter the cache.

A full pass may take segment ids: the rows of supervised fine-tuning hold several examples
packed one after another, and `attention_mask` keeps each token to the earlier tokens of its
own example.

Array names carry their shapes (`q_BxHxTxD`): B batch, T tokens of this call, S cache slots,
H heads, K key/value heads, G = H / K, N = B * K, D head_dim, C embed.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model.config import GPTConfig
from gptjax.model.decode_layout import dense_layers
from gptjax.model.layers import RMSNorm, matmul, residual_std, saved
from gptjax.model.platform import resolve_attention
from gptjax.model.rope import apply_rope, rope_angles

DropoutFn = Callable[[jax.Array], jax.Array]  # attention probabilities -> the same, dropped out


def attention_mask(t: int, token_mask: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array:
    """Which keys each query of a full (not cached) pass may attend to: bool [B or 1, 1, T, T].

    A query at position i sees keys j <= i; with token_mask [B, T] only real (True) keys; with
    segment_ids [B, T] only keys of its own segment (its example, in a packed row).
    """
    mask_BxHxTxS = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if token_mask is not None:
        mask_BxHxTxS = mask_BxHxTxS & token_mask[:, None, None, :]
    if segment_ids is not None:
        mask_BxHxTxS = mask_BxHxTxS & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask_BxHxTxS


def einsum_attention(q_BxHxTxD: jax.Array, k_BxKxTxD: jax.Array, v_BxKxTxD: jax.Array, token_mask: jax.Array | None,
                     segment_ids: jax.Array | None, dropout: DropoutFn) -> jax.Array:
    """The reference (`model.attention="xla"`): masked by `attention_mask`, fp32 scores and
    softmax, the probabilities dropped out and multiplied with v in the compute dtype.

    The G query heads of a key/value head are one longer query axis ([B, K, G * T, D], the
    queries' own memory order), so grouped-query attention makes no repeated keys or values.
    """
    b, h, t, d = q_BxHxTxD.shape
    kv = k_BxKxTxD.shape[1]
    scores_BxHxTxS = matmul("bkqd,bksd->bkqs", q_BxHxTxD.reshape(b, kv, -1, d), k_BxKxTxD).reshape(b, h, t, -1)
    probs_BxHxTxS = _softmax(scores_BxHxTxS, attention_mask(t, token_mask, segment_ids), d, dropout, q_BxHxTxD.dtype)
    return matmul("bkqs,bksd->bkqd", probs_BxHxTxS.reshape(b, kv, -1, t), v_BxKxTxD).reshape(b, h, t, d)


def cached_attention(q_BxHxTxD: jax.Array, k_NxSxD: jax.Array, v_NxSxD: jax.Array, mask_BxHxTxS: jax.Array,
                     dropout: DropoutFn) -> jax.Array:
    """The reference over a key/value cache whose rows and key/value heads are merged
    (N = B * K): the matmuls read the cache in the layout it is written, so XLA updates it in
    place. The G query heads of a key/value head are one query axis of G * T rows."""
    b, h, t, d = q_BxHxTxD.shape
    n = k_NxSxD.shape[0]
    scores_BxHxTxS = matmul("nqd,nkd->nqk", q_BxHxTxD.reshape(n, -1, d), k_NxSxD).reshape(b, h, t, -1)
    probs_BxHxTxS = _softmax(scores_BxHxTxS, mask_BxHxTxS, d, dropout, q_BxHxTxD.dtype)
    y_NxTxD = matmul("nqk,nkd->nqd", probs_BxHxTxS.reshape(n, h * b // n * t, -1), v_NxSxD)
    return y_NxTxD.reshape(b, h, t, d)


def _softmax(scores_BxHxTxS: jax.Array, mask_BxHxTxS: jax.Array, head_dim: int, dropout: DropoutFn,
             dtype: jnp.dtype) -> jax.Array:
    """The attention probabilities: softmax over the keys of the scaled, masked fp32 scores,
    dropped out, in `dtype` (the compute dtype, that of q, k, v and the cache)."""
    scores_BxHxTxS = jnp.where(mask_BxHxTxS, scores_BxHxTxS * (1.0 / math.sqrt(head_dim)), jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    return dropout(probs_BxHxTxS).astype(dtype)


def fused_attention(q_BxHxTxD: jax.Array, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None,
                    segment_ids: jax.Array | None) -> jax.Array:
    """Causal attention by `jax.nn.dot_product_attention` (`model.attention="dot_product"`),
    masked as `attention_mask` says: [B, H, T, D] in, [B, H, T, D] out.

    The implementation is cuDNN's fused kernel on a GPU with a 16-bit compute dtype (it takes
    no fp32), XLA's elsewhere (the same arithmetic as the einsums, without attention dropout).
    Both take fewer key/value heads than query heads as they are.
    """
    implementation = "cudnn" if jax.default_backend() == "gpu" and q_BxHxTxD.dtype != jnp.float32 else "xla"
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BxHxTxD, k_BxHxTxD, v_BxHxTxD))  # [B, T, H, D]
    if token_mask is None and segment_ids is None:
        y_BxTxHxD = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    else:
        mask_BxHxTxS = attention_mask(q.shape[1], token_mask, segment_ids)
        y_BxTxHxD = jax.nn.dot_product_attention(q, k, v, mask=mask_BxHxTxS, implementation=implementation)
    return jnp.swapaxes(y_BxTxHxD, 1, 2)


def _splash_attention(q_BxHxTxD: jax.Array, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None,
                      segment_ids: jax.Array | None) -> jax.Array:
    """`gptjax.model.splash.splash_attention`, imported on use: Pallas is a heavy import. With
    fewer key/value heads each is repeated for its query heads (the kernel's multi-head form)."""
    from gptjax.model.splash import splash_attention

    groups = q_BxHxTxD.shape[1] // k_BxHxTxD.shape[1]
    if groups > 1:
        k_BxHxTxD, v_BxHxTxD = (jnp.repeat(x, groups, axis=1) for x in (k_BxHxTxD, v_BxHxTxD))
    return splash_attention(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, token_mask, segment_ids)


def _splash_prescaled(q_BxHxTxD: jax.Array, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None,
                      segment_ids: jax.Array | None) -> jax.Array:
    """`_splash_attention` of queries already scaled by 1 / sqrt(head_dim) (`folded_q_scale`)."""
    from gptjax.model.splash import splash_attention

    return splash_attention(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, token_mask, segment_ids, q_scaled=True)


def folded_q_scale(cfg: GPTConfig, implementation: str | None, decode_layout: bool) -> float:
    """The splash kernel's query scale 1 / sqrt(head_dim), for the fused projection to apply in
    fp32 before its rounding to the compute dtype (so XLA fuses it into the projection rather
    than making another pass over q), when that is exact: 1 / sqrt(head_dim) a power of two
    (head_dim 4, 16, 64, 256: GPT-2's 64), so scaling commutes with rounding and q is bit for
    bit the kernel's own scaling's; with the fused c_attn, no QK-norm and no RoPE between the
    two. Else 1.0 (the kernel scales q itself)."""
    scale = 1.0 / math.sqrt(cfg.head_dim)
    exact = math.log2(scale).is_integer()
    fused = cfg.kv_heads == cfg.n_head and not cfg.qk_norm and cfg.position == "learned" and not decode_layout
    return scale if implementation == "splash" and exact and fused else 1.0


def _without_dropout(attend: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """An implementation that has no attention dropout, in the table's signature."""
    return lambda q, k, v, token_mask, segment_ids, dropout: attend(q, k, v, token_mask, segment_ids)


# model.attention -> a full pass's implementation; its keys are `gptjax.model.config.ATTENTION`.
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": einsum_attention,
    "dot_product": _without_dropout(fused_attention),
    "splash": _without_dropout(_splash_attention),
}


class CausalSelfAttention(nn.Module):
    """GPT-2's attention and its options: the query/key/value projection (`c_attn`, or
    `q_proj` and `kv_proj` with fewer key/value heads), QK-norm and RoPE when configured,
    attention, the output projection (`c_proj`) and dropout.

    Head-major layout throughout: q, k, v and the cache are [batch, heads, seq, head_dim], so
    the attention matmuls batch over leading axes and need no transposed copies.
    """

    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, positions_BxT: jax.Array, token_mask: jax.Array | None,
                 segment_ids: jax.Array | None, deterministic: bool, decode: bool) -> jax.Array:
        cfg = self.cfg
        projection, _ = dense_layers(self.decode_layout)
        implementation = None if decode else resolve_attention(cfg)
        q_scale = folded_q_scale(cfg, implementation, self.decode_layout)
        q_BxHxTxD, k_BxKxTxD, v_BxKxTxD = self._project(x_BxTxC, q_scale)
        if cfg.qk_norm:  # per head, over head_dim, shared by all heads
            q_BxHxTxD, k_BxKxTxD = (
                RMSNorm(cfg.ln_eps, "head_dim", name=name)(x).astype(x.dtype)
                for name, x in (("ln_q", q_BxHxTxD), ("ln_k", k_BxKxTxD))
            )
        if cfg.position == "rope":
            cos, sin = rope_angles(positions_BxT, cfg.head_dim, cfg.rope_base)
            q_BxHxTxD, k_BxKxTxD = apply_rope(q_BxHxTxD, cos, sin), apply_rope(k_BxKxTxD, cos, sin)
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)  # of the attention probabilities
        if decode:
            k_NxSxD, v_NxSxD, mask_BxHxTxS = self._update_cache(k_BxKxTxD, v_BxKxTxD, token_mask)
            y_BxHxTxD = cached_attention(q_BxHxTxD, k_NxSxD, v_NxSxD, mask_BxHxTxS, dropout)
        else:
            attend = _without_dropout(_splash_prescaled) if q_scale != 1.0 else IMPLEMENTATIONS[implementation]
            y_BxHxTxD = saved(attend(q_BxHxTxD, k_BxKxTxD, v_BxKxTxD, token_mask, segment_ids, dropout))
        y_BxTxC = projection(
            "bhtd,hdc->btc",
            kernel_shape=(cfg.n_head, cfg.head_dim, cfg.n_embd),
            kernel_axes=("heads", "head_dim", "embed"),
            std=residual_std(cfg),
            dtype=cfg.compute_dtype,
            use_bias=cfg.bias,
            name="c_proj",
        )(y_BxHxTxD)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)

    def _project(self, x_BxTxC: jax.Array, q_scale: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, H, T, D] and k, v [B, K, T, D] in the compute dtype: GPT-2's fused `c_attn`
        when K = H (q times `q_scale`, see `folded_q_scale`), else `q_proj` [C, H, D] and
        `kv_proj` [C, 2, K, D]."""
        cfg = self.cfg
        projection, qkv_projection = dense_layers(self.decode_layout)
        if cfg.kv_heads == cfg.n_head:
            return qkv_projection(cfg, q_scale=q_scale, name="c_attn")(x_BxTxC)
        c, h, kv, d, dtype = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.compute_dtype
        q_BxTxHxD = projection("btc,chd->bthd", kernel_shape=(c, h, d), kernel_axes=("embed", "heads", "head_dim"),
                               std=0.02, dtype=dtype, use_bias=cfg.bias, name="q_proj")(x_BxTxC)
        kv_BxTx2xKxD = projection("btc,cjkd->btjkd", kernel_shape=(c, 2, kv, d),
                                  kernel_axes=("embed", "qkv", "kv_heads", "head_dim"),
                                  std=0.02, dtype=dtype, use_bias=cfg.bias, name="kv_proj")(x_BxTxC)
        heads_first = lambda y: jnp.swapaxes(y, 1, 2).astype(dtype)
        return heads_first(q_BxTxHxD), heads_first(kv_BxTx2xKxD[:, :, 0]), heads_first(kv_BxTx2xKxD[:, :, 1])

    def _update_cache(
        self, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:  # here H counts the K key/value heads
        """Write this call's keys/values at the cache index; return all keys, values and the mask.

        The cache (the `cache` collection) holds keys and values as [batch * kv heads, slots,
        head_dim] (N x S x D), the layout the attention's matmuls read. (From a [batch, heads,
        ...] cache with one row, XLA folds the unit batch axis away between the update and the
        matmul, and then copies every cache buffer once per decode step.) The updated keys and
        values pass an optimization barrier before the matmuls read them: with a bfloat16
        cache, XLA's CPU backend upcasts the matmuls' operands to fp32, and without the barrier
        it writes the cache in fp32 and converts it back, copying every buffer, at every step.
        S is the sequence length the cache was initialised with. A query at slot i sees slots
        j <= i whose token was real (token_mask True when written).
        """
        b, h, t, d = k_BxHxTxD.shape
        is_initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, (b * h, t, d), k_BxHxTxD.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, (b * h, t, d), v_BxHxTxD.dtype)
        valid = self.variable("cache", "valid", jnp.zeros, (b, t), jnp.bool_)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        k_NxTxD, v_NxTxD = k_BxHxTxD.reshape(b * h, t, d), v_BxHxTxD.reshape(b * h, t, d)
        if not is_initialized:  # model.init(decode=True) only shapes the cache
            return k_NxTxD, v_NxTxD, jnp.ones((1, 1, t, t), bool)
        s = cached_k.value.shape[1]
        i = index.value
        tm_BxT = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
        cached_k.value, cached_v.value = jax.lax.optimization_barrier((
            jax.lax.dynamic_update_slice(cached_k.value, k_NxTxD.astype(cached_k.value.dtype), (0, i, 0)),
            jax.lax.dynamic_update_slice(cached_v.value, v_NxTxD.astype(cached_v.value.dtype), (0, i, 0)),
        ))
        valid.value = jax.lax.dynamic_update_slice(valid.value, tm_BxT, (0, i))
        index.value = i + t
        q_slot_Tx1 = i + jnp.arange(t)[:, None]
        k_slot_1xS = jnp.arange(s)[None, :]
        mask_BxHxTxS = (k_slot_1xS <= q_slot_Tx1)[None, None] & valid.value[:, None, None, :]
        return cached_k.value, cached_v.value, mask_BxHxTxS
