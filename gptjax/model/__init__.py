"""GPT-2 in Flax linen, in small pieces.

    config.py         GPTConfig: the model's shape and numerics (`config.model`), without Flax
    gpt.py            GPT, Block, MLP and init_params: the model, top to bottom
    attention.py      CausalSelfAttention, the causal mask, and the implementations that
                      `model.attention` names ("xla", "dot_product", "splash")
    splash.py         the Pallas splash attention kernel (TPU)
    platform.py       the platform a program is traced for; model.attention="auto"'s choice
    layers.py         the fp32-accumulating matmul, the dense projections, LayerNorm
    decode_layout.py  the [out, in] projections the sampler decodes with, and to_decode_layout

Importing this package does not import Flax: `GPTConfig` is here at once, and the Flax pieces
(`GPT`, `init_params`, ...) are imported on first use, so code that only needs a model's shape
(sampling with stored programs, the checkpoint tools) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from gptjax.model.config import ATTENTION, DTYPES, GPTConfig

_LAZY = {
    "GPT": "gpt",
    "Block": "gpt",
    "init_params": "gpt",
    "CausalSelfAttention": "attention",
    "attention_mask": "attention",
    "matmul": "layers",
    "to_decode_layout": "decode_layout",
}

__all__ = ["ATTENTION", "DTYPES", "GPTConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    """The Flax pieces, imported from their module when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
