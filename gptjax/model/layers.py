"""The model's building blocks: the mixed-precision matmul, the dense projections, the norms
(`NORMS`, by `model.norm`), the output head's table and soft-capping.

Parameters are fp32 and carry logical axis names (`gptjax.sharding` maps them to mesh axes);
every matmul reads its operands in the compute dtype and accumulates in fp32 (`matmul`). The
projections here store their kernels as flax does, [in..., out...], the layout training uses;
`gptjax.model.decode_layout` has the [out, in] versions that decoding on a CPU reads.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gptjax.model.config import GPTConfig


SAVED_NAME = "matmul"  # the tag of the values model.remat_policy="dots" saves (`remat_policy`)


def remat_policy(cfg: GPTConfig) -> Any:
    """The `jax.checkpoint` policy of `cfg.saved` ("everything" has none: no remat at all)."""
    policies = jax.checkpoint_policies
    return {"nothing": policies.nothing_saveable, "dots": policies.save_only_these_names(SAVED_NAME)}.get(cfg.saved)


def saved(x: jax.Array) -> jax.Array:
    """Tag a projection's or attention's output as one model.remat_policy="dots" keeps (a
    no-op otherwise). A name, not `dots_saveable`: that policy cannot see into `matmul`'s
    custom gradient rule."""
    return checkpoint_name(x, SAVED_NAME)


def normal(std: float, names: tuple[str | None, ...]) -> Any:
    """A normal(0, std) initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones(names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(cfg: GPTConfig, name: str) -> nn.Module:
    """An fp32 LayerNorm with GPT-2's epsilon (`model.ln_eps`), its bias only with `model.bias`."""
    return nn.LayerNorm(
        epsilon=cfg.ln_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_bias=cfg.bias,
        scale_init=ones(("norm",)),
        bias_init=zeros(("norm",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """x / rms(x) * scale in fp32 over the last axis (Llama's; no bias, no mean subtraction)."""

    eps: float
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", ones((self.axis_name,)), (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


def rms_norm(cfg: GPTConfig, name: str) -> nn.Module:
    return RMSNorm(cfg.ln_eps, name=name)


# model.norm -> (cfg, name) -> the norm module of ln_1, ln_2 and ln_f; keys: gptjax.model.config.NORMS.
NORMS = {"layernorm": layer_norm, "rmsnorm": rms_norm}


def norm(cfg: GPTConfig, name: str) -> nn.Module:
    """The block's norm (`model.norm`) named `name`."""
    return NORMS[cfg.norm](cfg, name)


def residual_std(cfg: GPTConfig) -> float:
    """The init std of a projection that writes into the residual stream (GPT-2's scaling;
    0, a zero kernel, with `model.zero_init_proj`)."""
    return 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)


def head_table(cfg: GPTConfig, params: Any) -> jax.Array:
    """The output head's [vocab, embed] table: `wte` when tied, else `lm_head/kernel` (stored
    [out, in], as the tied table is)."""
    return params["wte"]["embedding"] if cfg.tie_embeddings else params["lm_head"]["kernel"]


class UntiedHead(nn.Module):
    """The untied output head's table `kernel` [vocab, embed] (`model.tie_embeddings=False`):
    stored [out, in], as the tied `wte` table is and as Hugging Face stores `lm_head.weight`."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.cfg.vocab_size, self.cfg.n_embd)
        return self.param("kernel", normal(0.02, ("vocab", "embed")), shape, jnp.float32)


def head_logits(cfg: GPTConfig, hidden_BxTxC: jax.Array, table_VxC: jax.Array) -> jax.Array:
    """fp32 logits [B, T, V] of the final norm's output under the head's [vocab, embed] table,
    in the compute dtype, soft-capped when `model.logit_softcap` is set. Padded rows
    (`model.vocab_multiple`) make no logits: V is the real vocabulary."""
    dtype = cfg.compute_dtype
    table_VxC = table_VxC[: cfg.vocab_size].astype(dtype)
    return soft_cap(matmul("btc,vc->btv", hidden_BxTxC.astype(dtype), table_VxC), cfg.logit_softcap)


def soft_cap(logits: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(logits / cap) in fp32 (`model.logit_softcap`); the logits as they are when cap is 0."""
    if not cap:
        return logits
    return cap * jnp.tanh(logits.astype(jnp.float32) / cap)


QKV_AXES = ("embed", "qkv", "heads", "head_dim")  # the fused query/key/value kernel's logical axes


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
    output projection) so each axis can carry its own logical name; the bias has the kernel's
    output axes (none with `use_bias=False`).
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    std: float
    dtype: Any
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", normal(self.std, self.kernel_axes), self.kernel_shape, jnp.float32)
        return saved(matmul(self.equation, x.astype(self.dtype), kernel.astype(self.dtype)) + self._bias())

    def _bias(self) -> jax.Array:
        """The fp32 bias: zeros over the kernel's axes that the output keeps (a scalar 0 without one)."""
        if not self.use_bias:
            return jnp.zeros((), jnp.float32)
        inputs, out_spec = self.equation.split("->")
        dims = [i for i, a in enumerate(inputs.split(",")[1]) if a in out_spec]
        shape, axes = tuple(self.kernel_shape[i] for i in dims), tuple(self.kernel_axes[i] for i in dims)
        return self.param("bias", zeros(axes), shape, jnp.float32)


class QKVProjection(nn.Module):
    """The fused query/key/value projection of multi-head attention: one kernel [embed, 3,
    heads, head_dim] (GPT-2's `c_attn`) and bias [3, heads, head_dim], applied as three einsums that each write
    [batch, heads, seq, head_dim] in the compute dtype (on CPU, measured faster forward and
    backward than one wide matmul followed by a transpose)."""

    cfg: GPTConfig
    q_scale: float = 1.0  # q is multiplied by it in fp32, before the rounding to the compute dtype

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        h, d, dtype = cfg.n_head, cfg.head_dim, cfg.compute_dtype
        kernel_Cx3xHxD = self.param("kernel", normal(0.02, QKV_AXES), (cfg.n_embd, 3, h, d), jnp.float32)
        bias_3xHxD = qkv_bias(self, cfg)
        x_BxTxC, kernel_Cx3xHxD = x_BxTxC.astype(dtype), kernel_Cx3xHxD.astype(dtype)

        def out(j: int) -> jax.Array:
            y = matmul("btc,chd->bhtd", x_BxTxC, kernel_Cx3xHxD[:, j]) + bias_3xHxD[j][:, None, :]
            if j == 0 and self.q_scale != 1.0:
                y = y * self.q_scale
            return saved(y.astype(dtype))

        return out(0), out(1), out(2)



def qkv_bias(module: nn.Module, cfg: GPTConfig) -> jax.Array:
    """The fused projection's bias [3, heads, head_dim] (zeros [3, 1, 1] without `model.bias`)."""
    if not cfg.bias:
        return jnp.zeros((3, 1, 1), jnp.float32)
    return module.param("bias", zeros(QKV_AXES[1:]), (3, cfg.n_head, cfg.head_dim), jnp.float32)
