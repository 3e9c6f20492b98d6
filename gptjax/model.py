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

Parameter names follow Hugging Face's GPT-2 (`wte`, `wpe`, `h_{i}`, `ln_1`, `attn`, `c_attn`,
`c_proj`, `ln_2`, `mlp`, `c_fc`, `ln_f`) so that a reader can map the two by eye.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape and numerics of a GPT. Built from `config.model` with `GPTConfig.from_config`."""

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_mlp: int = 0  # 0 means 4 * n_embd
    block_size: int = 1024  # the longest context, and the number of learned positions
    dropout: float = 0.0
    ln_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters are always fp32
    remat: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_head={self.n_head} must divide model.n_embd={self.n_embd} "
                f"(allowed: a head count that divides the width, e.g. {_divisors(self.n_embd)})"
            )
        if self.n_mlp < 0:
            raise UserError(f"model.n_mlp must be >= 0 (0 means 4 * n_embd), got {self.n_mlp}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(model_cfg) - fields)
        if unknown:
            raise UserError(f"unknown model field(s) {unknown}; allowed: {sorted(fields)}")
        return cls(**{k: model_cfg[k] for k in model_cfg})

    @property
    def mlp_dim(self) -> int:
        return self.n_mlp or 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def num_params(self) -> int:
        """Parameter count (the tied output head counted once)."""
        c, m, layers = self.n_embd, self.mlp_dim, self.n_layer
        block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * m + m) + (m * c + c)
        return self.vocab_size * c + self.block_size * c + layers * block + 2 * c

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention."""
        n = self.num_params() - self.block_size * self.n_embd
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * seq_len


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


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
    output projection) so each axis can carry its own logical name.
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    std: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_axes = self.equation.split("->")[1]
        in_axes = self.equation.split("->")[0].split(",")[1]
        bias_dims = [i for i, a in enumerate(in_axes) if a in out_axes]
        kernel = self.param("kernel", _init(self.std, self.kernel_axes), self.kernel_shape, jnp.float32)
        bias = self.param(
            "bias",
            _zeros(tuple(self.kernel_axes[i] for i in bias_dims)),
            tuple(self.kernel_shape[i] for i in bias_dims),
            jnp.float32,
        )
        return matmul(self.equation, x.astype(self.dtype), kernel.astype(self.dtype)) + bias


class QKVProjection(nn.Module):
    """The fused query/key/value projection: one kernel [embed, 3, heads, head_dim] (GPT-2's
    `c_attn`) and bias [3, heads, head_dim], applied as three einsums that each write
    [batch, heads, seq, head_dim] directly (on CPU, measured faster forward and backward than
    one wide matmul followed by a transpose)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        h, d = cfg.n_head, cfg.head_dim
        axes = ("embed", "qkv", "heads", "head_dim")
        kernel = self.param("kernel", _init(0.02, axes), (cfg.n_embd, 3, h, d), jnp.float32)
        bias = self.param("bias", _zeros(axes[1:]), (3, h, d), jnp.float32)
        x, kernel = x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype)
        return tuple(
            (matmul("btc,chd->bhtd", x, kernel[:, j]) + bias[j][:, None, :]).astype(cfg.compute_dtype) for j in range(3)
        )


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None, deterministic: bool, decode: bool) -> jax.Array:
        cfg = self.cfg
        h, d = cfg.n_head, cfg.head_dim
        # Head-major layout throughout: q, k, v and the cache are [batch, heads, seq, head_dim],
        # so the attention matmuls batch over leading axes and need no transposed copies.
        q, k, v = QKVProjection(cfg, name="c_attn")(x)
        t = x.shape[1]
        if decode:
            k, v, mask = self._update_cache(k, v, token_mask)
        else:
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
            if token_mask is not None:
                mask = mask & token_mask[:, None, None, :]
        # q, k, v (and the cache) are already in the compute dtype.
        scores = matmul("bhqd,bhkd->bhqk", q, k)
        scores = jnp.where(mask, scores * (1.0 / math.sqrt(d)), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
        y = matmul("bhqk,bhkd->bhqd", probs.astype(cfg.compute_dtype), v)
        y = Projection(
            "bhtd,hdc->btc",
            kernel_shape=(h, d, cfg.n_embd),
            kernel_axes=("heads", "head_dim", "embed"),
            std=0.02 / math.sqrt(2 * cfg.n_layer),
            dtype=cfg.compute_dtype,
            name="c_proj",
        )(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)

    def _update_cache(
        self, k: jax.Array, v: jax.Array, token_mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Write this chunk's keys/values at the cache index; return all keys, values and the mask.

        The cache's length is the sequence length the cache was initialised with. A query at
        slot i sees slots j <= i whose token was real (token_mask True when written).
        """
        is_initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        valid = self.variable("cache", "valid", jnp.zeros, (k.shape[0], k.shape[2]), jnp.bool_)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if not is_initialized:  # model.init(decode=True) only shapes the cache
            mask = jnp.ones((1, 1, k.shape[2], k.shape[2]), bool)
            return k, v, mask
        b, t = k.shape[0], k.shape[2]
        length = cached_k.value.shape[2]
        i = index.value
        tm = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, 0, i, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, 0, i, 0))
        valid.value = jax.lax.dynamic_update_slice(valid.value, tm, (0, i))
        index.value = i + t
        q_slot = i + jnp.arange(t)[:, None]
        k_slot = jnp.arange(length)[None, :]
        mask = (k_slot <= q_slot)[None, None] & valid.value[:, None, None, :]
        return cached_k.value, cached_v.value, mask


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        x = Projection(
            "btc,cm->btm",
            kernel_shape=(cfg.n_embd, cfg.mlp_dim),
            kernel_axes=("embed", "mlp"),
            std=0.02,
            dtype=cfg.compute_dtype,
            name="c_fc",
        )(x)
        x = nn.gelu(x, approximate=True)
        x = Projection(
            "btm,mc->btc",
            kernel_shape=(cfg.mlp_dim, cfg.n_embd),
            kernel_axes=("mlp", "embed"),
            std=0.02 / math.sqrt(2 * cfg.n_layer),
            dtype=cfg.compute_dtype,
            name="c_proj",
        )(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None, deterministic: bool, decode: bool) -> jax.Array:
        cfg = self.cfg
        x = x + CausalSelfAttention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x), token_mask, deterministic, decode)
        x = x + MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x), deterministic)
        return nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))


class GPT(nn.Module):
    """A GPT-2 language model: token ids [batch, seq] -> fp32 logits [batch, seq, vocab]."""

    cfg: GPTConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Logits for every position.

        positions: [batch, seq] position ids (default 0..seq-1).
        token_mask: [batch, seq], False for padding; padded keys are never attended to.
        decode: use and update the key/value cache (see the module docstring).
        return_hidden: return the final LayerNorm's output [batch, seq, n_embd] instead of the
            logits, for a loss that applies the tied head itself (`gptjax.train.head_cross_entropy`).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
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
        x = wte(tokens) + wpe(positions)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        block = nn.remat(Block, static_argnums=(3, 4)) if cfg.remat else Block
        for i in range(cfg.n_layer):
            x = block(cfg, name=f"h_{i}")(x, token_mask, deterministic, decode)
        x = _layer_norm(cfg, "ln_f")(x)
        if return_hidden:
            return x.astype(cfg.compute_dtype)
        return matmul("btc,vc->btv", x.astype(cfg.compute_dtype), wte.embedding.astype(cfg.compute_dtype))


def init_params(cfg: GPTConfig, rng: jax.Array) -> Any:
    """Unboxed fp32 parameters (no sharding; see `gptjax.train` for the sharded version)."""
    variables = GPT(cfg).init(rng, jnp.zeros((1, min(8, cfg.block_size)), jnp.int32))
    return nn.meta.unbox(variables["params"])
