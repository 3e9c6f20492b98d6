"""GPT-2 in Flax linen, in small pieces, with the options of modern blocks.

    config.py         GPTConfig: the model's shape and numerics (`config.model`), without Flax
    gpt.py            GPT, Block and init_params: the model, top to bottom
    attention.py      CausalSelfAttention, the causal mask, and the implementations that
                      `model.attention` names ("xla", "dot_product", "splash")
    rope.py           rotary position embeddings (`model.position="rope"`)
    mlp.py            the MLPs that `model.mlp` names ("gelu", "relu2", "swiglu")
    splash.py         the Pallas splash attention kernel (TPU)
    layers.py         the fp32-accumulating matmul, the dense projections, the norms that
                      `model.norm` names, the output head's table and soft-capping
    decode_layout.py  the [out, in] projections the sampler decodes with, and to_decode_layout

The parameter tree. The defaults make GPT-2's, with Hugging Face's names; each option changes
only what it names (C embed, H heads, K = `n_kv_head` or H, D head_dim, M mlp width, V vocab,
P block_size; kernels [in..., out...]):

    wte/embedding [V, C]; wpe/embedding [P, C] (position="learned" only); ln_f;
    lm_head/kernel [V, C] (tie_embeddings=False only; [out, in], like the tied table)
    h_{i}/ln_1, h_{i}/ln_2   LayerNorm: scale [C], bias [C] (bias=True only); RMSNorm: scale [C]
    h_{i}/attn/c_attn        kernel [C, 3, H, D], bias [3, H, D]          (K = H)
    h_{i}/attn/q_proj        kernel [C, H, D], bias [H, D]                (K < H)
    h_{i}/attn/kv_proj       kernel [C, 2, K, D], bias [2, K, D]          (K < H; keys, values)
    h_{i}/attn/ln_q, ln_k    RMSNorm scale [D] (qk_norm=True only)
    h_{i}/attn/c_proj        kernel [H, D, C], bias [C]
    h_{i}/mlp/c_fc, c_proj   kernel [C, M], [M, C], biases [M], [C]      (mlp="gelu" or "relu2")
    h_{i}/mlp/gate_proj, up_proj, down_proj   [C, M], [C, M], [M, C]     (mlp="swiglu")

Every bias exists only with bias=True. zero_init_proj starts attn/c_proj and the MLP's output
projection at zero; logit_softcap and RoPE have no parameters.

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
    "head_table": "layers",
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
