"""Rotary position embeddings (RoPE, `model.position="rope"`): positions as rotations of q and k.

Each head's query and key are rotated by angles `position * rope_base^(-2i/D)`, i < D/2, in
Llama's convention ("rotate half": dimension i pairs with i + D/2), so the score of a query
and a key depends only on their distance. The rotation has no parameters and reads the
positions the model is given (`positions_BxT`: per example in a packed row; the cache slot's
position when decoding), so keys are rotated once, before they enter the key/value cache.
The rotation runs in fp32 and returns the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions_BxT: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, 1, T, D/2] of each position's angles, for `apply_rope`."""
    inv_freq_F = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
    return jnp.cos(angles_BxTxF)[:, None], jnp.sin(angles_BxTxF)[:, None]


def apply_rope(x_BxHxTxD: jax.Array, cos_Bx1xTxF: jax.Array, sin_Bx1xTxF: jax.Array) -> jax.Array:
    """x rotated: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), x1 and x2 its two halves."""
    x = x_BxHxTxD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_Bx1xTxF - x2 * sin_Bx1xTxF, x2 * cos_Bx1xTxF + x1 * sin_Bx1xTxF], axis=-1)
    return rotated.astype(x_BxHxTxD.dtype)
