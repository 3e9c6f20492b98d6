"""The platform a program is being traced for, and the choices of `model.attention="auto"` and
`model.head_loss="auto"` for it.

A program is traced for the platform of the mesh it runs under (`jax.set_mesh`, as the train
and eval steps and the AOT tool's compiles for a TPU topology from a CPU do), else for JAX's
default backend. `resolve_attention` and `resolve_head_loss` pick each platform's fast path
from that.
"""

from __future__ import annotations

import jax

from gptjax.model.config import ATTENTION_AUTO, GPTConfig

# model.attention="auto": the platform's fused attention ("xla", the einsum reference, elsewhere)
AUTO_ATTENTION = {"tpu": "splash", "gpu": "dot_product"}


def trace_platform() -> str:
    """'tpu', 'gpu' or 'cpu': the active mesh's device platform, else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def resolve_attention(cfg: GPTConfig, platform: str | None = None) -> str:
    """The implementation a full pass uses (a key of `gptjax.model.attention.IMPLEMENTATIONS`).

    `model.attention` as given, unless "auto": then the splash kernel on a TPU, cuDNN's fused
    attention (`jax.nn.dot_product_attention`) on a GPU, the einsum reference on a CPU; and the
    reference wherever `model.dropout` > 0, since only it has attention dropout.
    `platform` defaults to `trace_platform()`.
    """
    if cfg.attention != ATTENTION_AUTO:
        return cfg.attention
    if cfg.dropout > 0:
        return "xla"
    return AUTO_ATTENTION.get(platform or trace_platform(), "xla")


def resolve_head_loss(cfg: GPTConfig, platform: str | None = None) -> str:
    """How the head's cross entropy is computed: "kernel" (`gptjax.model.head_kernel`) or "xla".
    `model.head_loss` as given, unless "auto": the kernel on a TPU, "xla" elsewhere.
    `platform` defaults to `trace_platform()`."""
    if cfg.head_loss != "auto":
        return cfg.head_loss
    return "kernel" if (platform or trace_platform()) == "tpu" else "xla"
