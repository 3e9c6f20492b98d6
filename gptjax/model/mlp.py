"""The block's MLPs by name (`model.mlp`): `MLPS` maps each name to its module.

    "gelu"    c_fc to the hidden width, tanh-GELU, c_proj back: GPT-2's
    "relu2"   the same projections with relu(x)^2 (as in modded-nanogpt and Primer)
    "swiglu"  down_proj(silu(gate_proj(x)) * up_proj(x)): Llama's

The hidden width is `GPTConfig.mlp_dim` (`model.n_mlp`, else the MLP's default). Each module
applies dropout to its output; the projection into the residual stream starts at
`gptjax.model.layers.residual_std` (zero with `model.zero_init_proj`).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model.config import DTYPES, GPTConfig
from gptjax.model.decode_layout import dense_layers
from gptjax.model.layers import residual_std, saved


def _relu2(x: jax.Array) -> jax.Array:
    return jnp.square(nn.relu(x))

# The activation of the two-projection MLPs, by model.mlp.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "relu2": _relu2,
}


class _MLPBase(nn.Module):
    cfg: GPTConfig
    decode_layout: bool = False

    def dense(self, equation: str, shape: tuple[int, int], axes: tuple[str, str], std: float, name: str) -> nn.Module:
        """A projection of this MLP (the training or decode layout), with the model's bias choice."""
        projection, _ = dense_layers(self.decode_layout)
        cfg = self.cfg
        return projection(equation, kernel_shape=shape, kernel_axes=axes, std=std, dtype=cfg.compute_dtype,
                          use_bias=cfg.bias, name=name)


def hidden(cfg: GPTConfig, h: jax.Array) -> jax.Array:
    """A hidden pre-activation as `model.activation_dtype` keeps it (tagged for the "dots"
    remat policy in that dtype), back in fp32 for the activation; as it is in fp32."""
    if cfg.activation_dtype == "float32":
        return h
    return saved(h.astype(DTYPES[cfg.activation_dtype])).astype(jnp.float32)


class MLP(_MLPBase):
    """c_fc to the hidden width (`model.n_mlp`), the activation of `model.mlp`, c_proj back, dropout."""

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        c, m = cfg.n_embd, cfg.mlp_dim
        h_BxTxM = hidden(cfg, self.dense("btc,cm->btm", (c, m), ("embed", "mlp"), 0.02, "c_fc")(x_BxTxC))
        h_BxTxM = ACTIVATIONS[cfg.mlp](h_BxTxM)
        y_BxTxC = self.dense("btm,mc->btc", (m, c), ("mlp", "embed"), residual_std(cfg), "c_proj")(h_BxTxM)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)


class SwiGLU(_MLPBase):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), dropout: Llama's MLP and parameter names."""

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        c, m = cfg.n_embd, cfg.mlp_dim
        gate_BxTxM = hidden(cfg, self.dense("btc,cm->btm", (c, m), ("embed", "mlp"), 0.02, "gate_proj")(x_BxTxC))
        up_BxTxM = hidden(cfg, self.dense("btc,cm->btm", (c, m), ("embed", "mlp"), 0.02, "up_proj")(x_BxTxC))
        h_BxTxM = nn.silu(gate_BxTxM) * up_BxTxM
        y_BxTxC = self.dense("btm,mc->btc", (m, c), ("mlp", "embed"), residual_std(cfg), "down_proj")(h_BxTxM)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)


# model.mlp -> the block's MLP module; keys: gptjax.model.config.MLPS.
MLPS: dict[str, type[_MLPBase]] = {"gelu": MLP, "relu2": MLP, "swiglu": SwiGLU}
