"""GPT-2 in Flax linen.

Token and learned position embeddings, pre-LayerNorm blocks of causal multi-head
self-attention and a tanh-GELU MLP, a final LayerNorm, and an output projection tied to the
token embedding. Parameters are fp32; the compute dtype (`model.dtype`) is the dtype of every
matmul's operands (and of the key/value cache), accumulated in fp32 (`matmul`); the residual
stream, LayerNorm, softmax and GELU stay fp32. Every parameter carries logical axis names
(see `gptjax.sharding` for the rules that map them to mesh axes).

The same modules serve training and decoding: with `decode=True` each attention layer keeps a
key/value cache in the `cache` collection, writes the keys and values of the tokens it is
given at the cache's current index, and attends over everything written so far. Prefill
passes a whole (padded) prompt at once; decoding then passes one token per call.

A full pass computes attention with einsums and a softmax (`model.attention="xla"`, the
reference), with `jax.nn.dot_product_attention` ("dot_product": cuDNN's fused kernel on a
GPU), or with the Pallas splash kernel ("splash", `gptjax.kernels`: TPU; interpreted on a CPU);
decoding always uses the einsums over its cache.

A full pass may take segment ids and per-example positions: the rows of supervised
fine-tuning hold several examples packed one after another, and `attention_mask` keeps each
token to the earlier tokens of its own example.

Array names carry their shapes (`q_BxHxTxD`): B batch, T tokens of this call, S cache slots,
H heads, D head_dim, C embed, M mlp, V vocabulary, O a layer's output width.

Parameter names follow Hugging Face's GPT-2 (`wte`, `wpe`, `h_{i}`, `ln_1`, `attn`, `c_attn`,
`c_proj`, `ln_2`, `mlp`, `c_fc`, `ln_f`) so that a reader can map the two by eye.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model_config import ATTENTION, DTYPES, GPTConfig  # noqa: F401 (re-exported: the model's schema)


def _init(std: float, names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.ln_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=_ones(("norm",)),
        bias_init=_zeros(("norm",)),
        name=name,
    )


def _transposed_equations(equation: str) -> tuple[str, str]:
    """For out = einsum("a,b->c"): the equations of d(a) = einsum("c,b->a") and d(b) = einsum("a,c->b")."""
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    for name, own, other in (("first", a, b), ("second", b, a)):
        if len(set(own)) != len(own) or not set(own) <= set(other) | set(out):
            raise ValueError(
                f"matmul {equation!r}: each index of the {name} operand must be unique and "
                "appear in the other operand or the output"
            )
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


def matmul(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A two-operand einsum that reads its operands in their dtype and accumulates in fp32.

    The result is fp32, and so are both matmuls of the gradient: the incoming gradient is cast
    to the operands' dtype and multiplied with fp32 accumulation. With bf16 operands every
    matmul, forward and backward, is then bf16 x bf16 -> fp32, the form accelerators (and
    XLA's CPU runtime, by oneDNN/AMX, measured 3-4x faster than bf16 -> bf16) run fastest;
    autodiff of a plain einsum would make bf16 -> bf16 or mixed-dtype matmuls. With fp32
    operands it is `jnp.einsum` and autodiff's gradient (the same matmuls; on CPU the custom
    rule measured slower on small fp32 shapes).
    """
    if a.dtype == b.dtype == jnp.float32:
        return jnp.einsum(equation, a, b)
    return _mixed_matmul(equation, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_matmul(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)


def _matmul_fwd(equation: str, a: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _mixed_matmul(equation, a, b), (a, b)


def _matmul_bwd(equation: str, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    eq_a, eq_b = _transposed_equations(equation)
    da = jnp.einsum(eq_a, g.astype(b.dtype), b, preferred_element_type=jnp.float32)
    db = jnp.einsum(eq_b, a, g.astype(a.dtype), preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_mixed_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Projection(nn.Module):
    """A linear map written as one einsum over a multi-axis kernel, plus a bias.

    The kernel keeps its natural axes (e.g. [heads, head_dim, embed] for the attention's
    output projection) so each axis can carry its own logical name. With `decode_layout` the
    kernel is instead one [out, in] matrix named `kernel_out_in` (see `to_decode_layout`).
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    std: float
    dtype: Any
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs, out_spec = self.equation.split("->")
        x_spec, k_spec = inputs.split(",")
        out_dims = [i for i, a in enumerate(k_spec) if a in out_spec]
        bias_shape = tuple(self.kernel_shape[i] for i in out_dims)
        bias_init = _zeros(tuple(self.kernel_axes[i] for i in out_dims))
        if not self.decode_layout:
            kernel = self.param("kernel", _init(self.std, self.kernel_axes), self.kernel_shape, jnp.float32)
            bias = self.param("bias", bias_init, bias_shape, jnp.float32)
            return matmul(self.equation, x.astype(self.dtype), kernel.astype(self.dtype)) + bias
        # x's own axes, then the contracted axes in the kernel's order: x[..., in] @ w[out, in]^T.
        lead = [a for a in x_spec if a not in k_spec]
        contracted = [a for a in k_spec if a in x_spec]
        if out_spec != "".join(lead) + "".join(k_spec[i] for i in out_dims):
            raise ValueError(f"decode layout: {self.equation!r} must write x's own axes, then the kernel's")
        n_in = math.prod(self.kernel_shape[k_spec.index(a)] for a in contracted)
        w_OxI = self.param("kernel_out_in", nn.initializers.normal(self.std), (math.prod(bias_shape), n_in), jnp.float32)
        bias = self.param("bias", bias_init, bias_shape, jnp.float32)
        x = jnp.transpose(x, [x_spec.index(a) for a in lead + contracted])
        lead_shape = x.shape[: len(lead)]
        y = _linear_out_in(x.reshape(*lead_shape, n_in), w_OxI, self.dtype) + bias.reshape(-1)
        return y.reshape(*lead_shape, *bias_shape)


def _linear_out_in(x: jax.Array, w_OxI: jax.Array, dtype: Any) -> jax.Array:
    """x[..., in] @ w[out, in]^T in the compute dtype, accumulated in fp32 (no gradient rule)."""
    return jax.lax.dot_general(
        x.astype(dtype), w_OxI.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


class QKVProjection(nn.Module):
    """The fused query/key/value projection: one kernel [embed, 3, heads, head_dim] (GPT-2's
    `c_attn`) and bias [3, heads, head_dim], applied as three einsums that each write
    [batch, heads, seq, head_dim] directly (on CPU, measured faster forward and backward than
    one wide matmul followed by a transpose). With `decode_layout` the kernel is one
    [3 * heads * head_dim, embed] matrix `kernel_out_in`, applied as one matmul."""

    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        h, d, dtype = cfg.n_head, cfg.head_dim, cfg.compute_dtype
        axes = ("embed", "qkv", "heads", "head_dim")
        if self.decode_layout:
            w_OxC = self.param("kernel_out_in", nn.initializers.normal(0.02), (3 * h * d, cfg.n_embd), jnp.float32)
            bias_3xHxD = self.param("bias", _zeros(axes[1:]), (3, h, d), jnp.float32)
            y_BxTxO = (_linear_out_in(x_BxTxC, w_OxC, dtype) + bias_3xHxD.reshape(-1)).astype(dtype)
            y_BxTx3xHxD = y_BxTxO.reshape(*x_BxTxC.shape[:2], 3, h, d)
            return tuple(jnp.swapaxes(y_BxTx3xHxD[:, :, j], 1, 2) for j in range(3))
        kernel_Cx3xHxD = self.param("kernel", _init(0.02, axes), (cfg.n_embd, 3, h, d), jnp.float32)
        bias_3xHxD = self.param("bias", _zeros(axes[1:]), (3, h, d), jnp.float32)
        x_BxTxC, kernel_Cx3xHxD = x_BxTxC.astype(dtype), kernel_Cx3xHxD.astype(dtype)
        return tuple(
            (matmul("btc,chd->bhtd", x_BxTxC, kernel_Cx3xHxD[:, j]) + bias_3xHxD[j][:, None, :]).astype(dtype)
            for j in range(3)
        )


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


def fused_attention(q_BxHxTxD: jax.Array, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None,
                    segment_ids: jax.Array | None) -> jax.Array:
    """Causal attention of a full pass by `jax.nn.dot_product_attention` (`model.attention=
    "dot_product"`), masked as `attention_mask` says: [B, H, T, D] in, [B, H, T, D] out.

    The implementation is cuDNN's fused kernel on a GPU with a 16-bit compute dtype (it takes
    no fp32), XLA's elsewhere (the same arithmetic as the einsums, without attention dropout).
    """
    implementation = "cudnn" if jax.default_backend() == "gpu" and q_BxHxTxD.dtype != jnp.float32 else "xla"
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BxHxTxD, k_BxHxTxD, v_BxHxTxD))  # [B, T, H, D]
    if token_mask is None and segment_ids is None:
        y_BxTxHxD = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    else:
        mask_BxHxTxS = attention_mask(q.shape[1], token_mask, segment_ids)
        y_BxTxHxD = jax.nn.dot_product_attention(q, k, v, mask=mask_BxHxTxS, implementation=implementation)
    return jnp.swapaxes(y_BxTxHxD, 1, 2)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, token_mask: jax.Array | None, segment_ids: jax.Array | None,
                 deterministic: bool, decode: bool) -> jax.Array:
        cfg = self.cfg
        h, d = cfg.n_head, cfg.head_dim
        # Head-major layout throughout: q, k, v and the cache are [batch, heads, seq, head_dim],
        # so the attention matmuls batch over leading axes and need no transposed copies.
        q_BxHxTxD, k_BxHxTxD, v_BxHxTxD = QKVProjection(cfg, self.decode_layout, name="c_attn")(x_BxTxC)
        if not decode and cfg.attention == "dot_product":
            y_BxHxTxD = fused_attention(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, token_mask, segment_ids)
        elif not decode and cfg.attention == "splash":
            from gptjax import kernels  # on use: Pallas is a heavy import

            y_BxHxTxD = kernels.splash_attention(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, token_mask, segment_ids)
        else:
            y_BxHxTxD = self._attend(q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, token_mask, segment_ids, deterministic, decode)
        y_BxTxC = Projection(
            "bhtd,hdc->btc",
            kernel_shape=(h, d, cfg.n_embd),
            kernel_axes=("heads", "head_dim", "embed"),
            std=0.02 / math.sqrt(2 * cfg.n_layer),
            dtype=cfg.compute_dtype,
            decode_layout=self.decode_layout,
            name="c_proj",
        )(y_BxHxTxD)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)

    def _attend(self, q_BxHxTxD: jax.Array, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None,
                segment_ids: jax.Array | None, deterministic: bool, decode: bool) -> jax.Array:
        """The einsum attention (`model.attention="xla"`, and decoding): [B, H, T, D], fp32."""
        cfg = self.cfg
        b, h, t, d = q_BxHxTxD.shape
        if decode:  # S: the cache's slots
            k_NxSxD, v_NxSxD, mask_BxHxTxS = self._update_cache(k_BxHxTxD, v_BxHxTxD, token_mask)
            # Rows and heads merged (N = B * H): the attention reads the cache in the layout
            # it is written, so XLA updates it in place (see `_update_cache`).
            q_NxTxD = q_BxHxTxD.reshape(b * h, t, d)
            scores_BxHxTxS = matmul("nqd,nkd->nqk", q_NxTxD, k_NxSxD).reshape(b, h, t, -1)
        else:  # S == T
            mask_BxHxTxS = attention_mask(t, token_mask, segment_ids)
            scores_BxHxTxS = matmul("bhqd,bhkd->bhqk", q_BxHxTxD, k_BxHxTxD)
        # q, k, v (and the cache) are already in the compute dtype.
        scores_BxHxTxS = jnp.where(mask_BxHxTxS, scores_BxHxTxS * (1.0 / math.sqrt(d)), jnp.finfo(jnp.float32).min)
        probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
        probs_BxHxTxS = nn.Dropout(cfg.dropout)(probs_BxHxTxS, deterministic=deterministic)
        probs_BxHxTxS = probs_BxHxTxS.astype(cfg.compute_dtype)
        if decode:
            y_NxTxD = matmul("nqk,nkd->nqd", probs_BxHxTxS.reshape(b * h, t, -1), v_NxSxD)
            return y_NxTxD.reshape(b, h, t, d)
        return matmul("bhqk,bhkd->bhqd", probs_BxHxTxS, v_BxHxTxD)

    def _update_cache(
        self, k_BxHxTxD: jax.Array, v_BxHxTxD: jax.Array, token_mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Write this call's keys/values at the cache index; return all keys, values and the mask.

        The cache holds keys and values as [batch * heads, slots, head_dim] (N x S x D), the
        layout the attention's matmuls read. (From a [batch, heads, ...] cache with one row,
        XLA folds the unit batch axis away between the update and the matmul, and then copies
        every cache buffer once per decode step.) The updated keys and values pass an
        optimization barrier before the matmuls read them: with a bfloat16 cache, XLA's CPU
        backend upcasts the matmuls' operands to fp32, and without the barrier it writes the
        cache in fp32 and converts it back, copying every buffer, at every step. S is the
        sequence length the cache was initialised with. A query at slot i sees slots j <= i
        whose token was real (token_mask True when written).
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


class MLP(nn.Module):
    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        h_BxTxM = Projection(
            "btc,cm->btm",
            kernel_shape=(cfg.n_embd, cfg.mlp_dim),
            kernel_axes=("embed", "mlp"),
            std=0.02,
            dtype=cfg.compute_dtype,
            decode_layout=self.decode_layout,
            name="c_fc",
        )(x_BxTxC)
        h_BxTxM = nn.gelu(h_BxTxM, approximate=True)
        y_BxTxC = Projection(
            "btm,mc->btc",
            kernel_shape=(cfg.mlp_dim, cfg.n_embd),
            kernel_axes=("mlp", "embed"),
            std=0.02 / math.sqrt(2 * cfg.n_layer),
            dtype=cfg.compute_dtype,
            decode_layout=self.decode_layout,
            name="c_proj",
        )(h_BxTxM)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, token_mask: jax.Array | None, segment_ids: jax.Array | None,
                 deterministic: bool, decode: bool) -> jax.Array:
        cfg, layout = self.cfg, self.decode_layout
        attn = CausalSelfAttention(cfg, layout, name="attn")
        x_BxTxC = x_BxTxC + attn(_layer_norm(cfg, "ln_1")(x_BxTxC), token_mask, segment_ids, deterministic, decode)
        x_BxTxC = x_BxTxC + MLP(cfg, layout, name="mlp")(_layer_norm(cfg, "ln_2")(x_BxTxC), deterministic)
        return nn.with_logical_constraint(x_BxTxC, ("batch", "seq", "act_embed"))


class GPT(nn.Module):
    """A GPT-2 language model: token ids [batch, seq] -> fp32 logits [batch, seq, vocab].

    decode_layout: every dense kernel is one [out, in] matrix (`to_decode_layout` makes such
    parameters). With few rows per step, as in decoding, XLA's CPU matmuls read that layout up
    to twice as fast as flax's [in, out]; the arithmetic is the same.
    """

    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Logits for every position.

        positions_BxT: position ids (default 0..seq-1); in a packed row, each token's position
            within its example.
        token_mask: [batch, seq], False for padding; padded keys are never attended to.
        segment_ids: [batch, seq] int, the example of each token in a packed row: a token attends
            only to tokens of its own segment (training and evaluation; not with decode).
        decode: use and update the key/value cache (see the module docstring).
        return_hidden: return the final LayerNorm's output [batch, seq, n_embd] instead of the
            logits, for a loss that applies the tied head itself (`gptjax.train.head_cross_entropy`).
        """
        cfg = self.cfg
        b, t = tokens_BxT.shape
        if decode and segment_ids is not None:
            raise ValueError("segment_ids are for full passes (training, evaluation), not for decoding")
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        wte = nn.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            embedding_init=_init(0.02, ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            cfg.block_size,
            cfg.n_embd,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            embedding_init=_init(0.01, ("pos", "embed")),
            name="wpe",
        )
        x_BxTxC = wte(tokens_BxT) + wpe(positions_BxT)
        x_BxTxC = nn.Dropout(cfg.dropout)(x_BxTxC, deterministic=deterministic)
        x_BxTxC = nn.with_logical_constraint(x_BxTxC, ("batch", "seq", "act_embed"))
        if cfg.scan_layers and not decode and not self.is_initializing():
            x_BxTxC = self._scan_blocks(x_BxTxC, token_mask, segment_ids, deterministic)
        else:
            block = nn.remat(Block, static_argnums=(4, 5)) if cfg.remat else Block
            for i in range(cfg.n_layer):
                x_BxTxC = block(cfg, self.decode_layout, name=f"h_{i}")(x_BxTxC, token_mask, segment_ids, deterministic, decode)
        x_BxTxC = _layer_norm(cfg, "ln_f")(x_BxTxC)
        if return_hidden:
            return x_BxTxC.astype(cfg.compute_dtype)
        # The tied head reads the [vocab, embed] table as stored: already the [out, in] layout.
        dtype = cfg.compute_dtype
        return matmul("btc,vc->btv", x_BxTxC.astype(dtype), wte.embedding.astype(dtype))

    def _scan_blocks(self, x_BxTxC: jax.Array, token_mask: jax.Array | None, segment_ids: jax.Array | None,
                     deterministic: bool) -> jax.Array:
        """The blocks of a full pass as one `jax.lax.scan` (`model.scan_layers`).

        The parameters stay one subtree per layer (`h_{i}`, as `init` makes them), so
        checkpoints, Hugging Face conversion, per-layer optimizer rules and the sampler read
        the same tree; here they are stacked on a leading layer axis (one copy of the block
        parameters per pass, split like each layer's by the mesh rules) and the scan body
        applies one `Block` to one layer's slice. Dropout draws a key per layer from this
        module's `dropout` stream. With `model.remat` the body is rematerialized.
        """
        cfg = self.cfg
        block = Block(cfg, self.decode_layout, parent=None)
        params = self.variables["params"]
        layers = [nn.meta.unbox(params[f"h_{i}"]) for i in range(cfg.n_layer)]
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        x_spec = jax.ShapeDtypeStruct(x_BxTxC.shape, x_BxTxC.dtype)
        boxed = jax.eval_shape(lambda x: block.init(jax.random.PRNGKey(0), x, None, None, True, False), x_spec)
        names = nn.get_partition_spec(boxed["params"])

        def constrain(tree: Any, lead: tuple[None, ...]) -> Any:
            def one(x: jax.Array, spec: Any) -> jax.Array:
                if len(spec) + len(lead) != x.ndim:  # a kernel without logical names (decode layout)
                    return x
                return nn.with_logical_constraint(x, (*lead, *spec))

            return jax.tree_util.tree_map(one, tree, names)

        stacked = constrain(stacked, (None,))
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), cfg.n_layer)

        def body(x_BxTxC: jax.Array, layer: tuple[Any, jax.Array | None]) -> tuple[jax.Array, None]:
            layer_params, key = layer
            rngs = None if key is None else {"dropout": key}
            x_BxTxC = block.apply({"params": constrain(layer_params, ())}, x_BxTxC, token_mask, segment_ids,
                                  deterministic, False, rngs=rngs)
            return x_BxTxC, None

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x_BxTxC, _ = jax.lax.scan(body, x_BxTxC, (stacked, keys))
        return x_BxTxC


def init_params(cfg: GPTConfig, rng: jax.Array) -> Any:
    """Unboxed fp32 parameters (no sharding; see `gptjax.train` for the sharded version)."""
    variables = GPT(cfg).init(rng, jnp.zeros((1, min(8, cfg.block_size)), jnp.int32))
    return nn.meta.unbox(variables["params"])


@functools.partial(jax.jit, static_argnums=0)
def to_decode_layout(cfg: GPTConfig, params: Any) -> Any:
    """The parameters of `GPT(cfg, decode_layout=True)`: every dense kernel as [out, in].

    Each `kernel` is replaced by `kernel_out_in`, the kernel reshaped to [in, out] (its
    contracted leading axes merged) and transposed; embeddings, LayerNorms and biases are
    shared. A tree that is not a GPT's parameters raises (KeyError, or flax's shape check).
    """

    def out_in(layer: Mapping[str, Any], n_in: int) -> dict[str, Any]:
        kernel = layer["kernel"]
        return {"kernel_out_in": kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T, "bias": layer["bias"]}

    out = {k: params[k] for k in ("wte", "wpe", "ln_f")}
    for i in range(cfg.n_layer):
        block = params[f"h_{i}"]
        attn, mlp = block["attn"], block["mlp"]
        out[f"h_{i}"] = {
            "ln_1": block["ln_1"],
            "ln_2": block["ln_2"],
            "attn": {"c_attn": out_in(attn["c_attn"], 1), "c_proj": out_in(attn["c_proj"], 2)},
            "mlp": {"c_fc": out_in(mlp["c_fc"], 1), "c_proj": out_in(mlp["c_proj"], 1)},
        }
    return out
