"""The decode layout: every dense kernel stored as one [out, in] matrix, for decoding on a CPU.

With few rows per step, as in decoding, XLA's CPU matmuls read an [out, in] kernel up to twice
as fast as flax's [in, out]; the arithmetic is the same. `GPT(cfg, decode_layout=True)` builds
its projections from `OutInProjection` and `OutInQKVProjection` (`dense_layers` picks them),
whose kernels are named `kernel_out_in`; `to_decode_layout` converts a GPT's parameters to
that layout. The sampler (`gptjax.sampling`) decodes with it; training never does.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model.config import GPTConfig
from gptjax.model.layers import Projection, QKVProjection, qkv_bias


def linear_out_in(x: jax.Array, w_OxI: jax.Array, dtype: Any) -> jax.Array:
    """x[..., in] @ w[out, in]^T in the compute dtype, accumulated in fp32 (no gradient rule)."""
    return jax.lax.dot_general(
        x.astype(dtype), w_OxI.astype(dtype), (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


class OutInProjection(Projection):
    """`Projection` with its kernel as one [out, in] matrix `kernel_out_in` (the bias as before).

    The equation must write x's own axes, then the kernel's output axes (as every projection
    of the model does): x is then brought to [..., in] and multiplied once.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs, out_spec = self.equation.split("->")
        x_spec, k_spec = inputs.split(",")
        lead = [a for a in x_spec if a not in k_spec]
        contracted = [a for a in k_spec if a in x_spec]
        kept = [a for a in k_spec if a in out_spec]
        if out_spec != "".join(lead + kept):
            raise ValueError(f"decode layout: {self.equation!r} must write x's own axes, then the kernel's")
        n_in, n_out = (math.prod(self.kernel_shape[k_spec.index(a)] for a in axes) for axes in (contracted, kept))
        w_OxI = self.param("kernel_out_in", nn.initializers.normal(self.std), (n_out, n_in), jnp.float32)
        bias = self._bias()
        x = jnp.transpose(x, [x_spec.index(a) for a in lead + contracted])
        lead_shape = x.shape[: len(lead)]
        y = linear_out_in(x.reshape(*lead_shape, n_in), w_OxI, self.dtype) + bias.reshape(-1)
        return y.reshape(*lead_shape, *(self.kernel_shape[k_spec.index(a)] for a in kept))


class OutInQKVProjection(QKVProjection):
    """`QKVProjection` with its kernel as one [3 * heads * head_dim, embed] matrix
    `kernel_out_in`, applied as one matmul whose output is split into q, k and v."""

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        h, d, dtype = cfg.n_head, cfg.head_dim, cfg.compute_dtype
        w_OxC = self.param("kernel_out_in", nn.initializers.normal(0.02), (3 * h * d, cfg.n_embd), jnp.float32)
        bias = qkv_bias(self, cfg)
        y_BxTxO = (linear_out_in(x_BxTxC, w_OxC, dtype) + (bias.reshape(-1) if cfg.bias else bias[0, 0])).astype(dtype)
        y_BxTx3xHxD = y_BxTxO.reshape(*x_BxTxC.shape[:2], 3, h, d)
        return tuple(jnp.swapaxes(y_BxTx3xHxD[:, :, j], 1, 2) for j in range(3))


_DENSE_LAYERS = {False: (Projection, QKVProjection), True: (OutInProjection, OutInQKVProjection)}


def dense_layers(decode_layout: bool) -> tuple[type[Projection], type[QKVProjection]]:
    """The (projection, fused qkv projection) classes of a model in the given layout."""
    return _DENSE_LAYERS[decode_layout]


@functools.partial(jax.jit, static_argnums=0)
def to_decode_layout(cfg: GPTConfig, params: Any) -> Any:
    """The parameters of `GPT(cfg, decode_layout=True)`: every dense kernel as [out, in].

    In each layer `h_{i}`, every `kernel` is replaced by `kernel_out_in`, the kernel reshaped
    to [in, out] (its contracted leading axes merged: two for the attention's output
    projection `attn/c_proj`, one elsewhere) and transposed; embeddings, norms, biases and the
    untied head's `lm_head` (already [out, in]) are shared. A tree that is not a GPT's
    parameters raises (KeyError, or flax's shape check).
    """

    def convert(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
        if "kernel" not in tree:
            return {k: convert(v, (*path, k)) if isinstance(v, Mapping) else v for k, v in tree.items()}
        kernel, n_in = tree["kernel"], 2 if path[-2:] == ("attn", "c_proj") else 1
        out = {"kernel_out_in": kernel.reshape(math.prod(kernel.shape[:n_in]), -1).T}
        return {**out, **{k: v for k, v in tree.items() if k != "kernel"}}

    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    for i in range(cfg.n_layer):
        out[f"h_{i}"] = convert(params[f"h_{i}"], ())
    return out
