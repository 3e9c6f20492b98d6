"""Hugging Face GPT-2 (`GPT2LMHeadModel`) <-> gptjax: config.json fields and the tensor layout.

Checkpoint conventions handled here: GPT-2's Conv1D weights are stored (in, out), so every
tensor maps to its gptjax parameter by a reshape alone; official checkpoints name tensors
`h.0.attn...` while `save_pretrained` of a `GPT2LMHeadModel` writes `transformer.h.0.attn...`;
`h.N.attn.bias` / `h.N.attn.masked_bias` are causal-mask buffers, not weights; the output head
`lm_head.weight` is tied to `wte` and is written only by some savers.

gptjax parameters use the same names (see `gptjax.model`) with `h_N` for `h.N`, `scale` for a
LayerNorm's `weight`, `embedding` for an embedding's `weight`, and multi-axis attention kernels:
c_attn (embd, 3*embd) -> (embd, 3, heads, head_dim), its bias (3*embd) -> (3, heads, head_dim),
attn.c_proj (embd, embd) -> (heads, head_dim, embd).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from gptjax.errors import UserError
from gptjax.hf.files import Entry, Layout, params_to_tensors, positive_float, positive_int, tensors_to_params
from gptjax.model import GPTConfig

MODEL_TYPE = "gpt2"
MODEL_CLASS = "GPT2LMHeadModel"
NAME = "GPT-2"
# The tanh approximation of GELU under its Hugging Face names; gptjax's MLP computes exactly it.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# GPT2Config's defaults, used for fields a config.json leaves out (as transformers does).
_HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}
# Config switches that change the computation away from what gptjax's GPT computes.
_UNSUPPORTED = {
    "scale_attn_weights": (True, "gptjax always scales attention scores by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "gptjax does not scale attention by 1/layer"),
    "add_cross_attention": (False, "gptjax models have no cross-attention"),
    "tie_word_embeddings": (True, "gptjax's GPT-2 ties the output head to the token embedding"),
}
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def rename(key: str) -> str | None:
    """A stored tensor's name without `transformer.`; None for a causal-mask buffer."""
    name = key.removeprefix("transformer.")
    return None if _BUFFER.match(name) else name


def fields_from_config(hf_config: Mapping[str, Any], path: str) -> dict[str, Any]:
    """GPTConfig field values (vocab_size, n_layer, n_head, n_embd, n_mlp, block_size, ln_eps)
    from a GPT-2 config.json's contents; a config gptjax cannot compute exactly is a UserError."""
    hf = {**_HF_DEFAULTS, **hf_config}
    if hf["activation_function"] not in TANH_GELUS:
        raise UserError(
            f"{path}: activation_function {hf['activation_function']!r} is not supported; "
            f"gptjax's MLP computes the tanh GELU ({', '.join(TANH_GELUS)})"
        )
    for key, (want, why) in _UNSUPPORTED.items():
        if key in hf and hf[key] != want:
            raise UserError(f"{path}: {key}={hf[key]!r} is not supported ({why})")
    n_inner = 0 if hf["n_inner"] is None else positive_int(hf, "n_inner", path)
    return {
        "vocab_size": positive_int(hf, "vocab_size", path),
        "n_layer": positive_int(hf, "n_layer", path),
        "n_head": positive_int(hf, "n_head", path),
        "n_embd": positive_int(hf, "n_embd", path),
        "n_mlp": n_inner,
        "block_size": positive_int(hf, "n_positions", path),
        "ln_eps": positive_float(hf, "layer_norm_epsilon", path),
    }


def layout(cfg: GPTConfig) -> Layout:
    """Hugging Face tensor name (no `transformer.`) -> its gptjax parameter; every map a reshape."""
    c, h, d, m = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.mlp_dim

    def same(path: tuple[str, ...], *shape: int) -> Entry:
        return Entry(path, shape, shape)

    out = {
        "wte.weight": same(("wte", "embedding"), cfg.vocab_size, c),
        "wpe.weight": same(("wpe", "embedding"), cfg.block_size, c),
        "ln_f.weight": same(("ln_f", "scale"), c),
        "ln_f.bias": same(("ln_f", "bias"), c),
    }
    for i in range(cfg.n_layer):
        hf, gj = f"h.{i}.", f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{hf}{ln}.weight"] = same((gj, ln, "scale"), c)
            out[f"{hf}{ln}.bias"] = same((gj, ln, "bias"), c)
        out[f"{hf}attn.c_attn.weight"] = Entry((gj, "attn", "c_attn", "kernel"), (c, 3 * c), (c, 3, h, d))
        out[f"{hf}attn.c_attn.bias"] = Entry((gj, "attn", "c_attn", "bias"), (3 * c,), (3, h, d))
        out[f"{hf}attn.c_proj.weight"] = Entry((gj, "attn", "c_proj", "kernel"), (c, c), (h, d, c))
        out[f"{hf}attn.c_proj.bias"] = same((gj, "attn", "c_proj", "bias"), c)
        out[f"{hf}mlp.c_fc.weight"] = same((gj, "mlp", "c_fc", "kernel"), c, m)
        out[f"{hf}mlp.c_fc.bias"] = same((gj, "mlp", "c_fc", "bias"), m)
        out[f"{hf}mlp.c_proj.weight"] = same((gj, "mlp", "c_proj", "kernel"), m, c)
        out[f"{hf}mlp.c_proj.bias"] = same((gj, "mlp", "c_proj", "bias"), c)
    return out


def hf_to_params(tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], source: str = "the checkpoint") -> dict:
    """gptjax parameters from Hugging Face GPT-2 tensors (names without `transformer.`)."""
    tensors = {k: v for k, v in tensors.items() if not _BUFFER.match(k)}  # the buffers, if a caller kept them
    params = tensors_to_params(tensors, layout(GPTConfig.from_config(fields)), source, frozenset({"lm_head.weight"}))
    head = tensors.get("lm_head.weight")
    if head is not None and not (head.shape == tensors["wte.weight"].shape and np.array_equal(head, tensors["wte.weight"])):
        raise UserError(
            f"{source}: lm_head.weight differs from wte.weight; gptjax supports only GPT-2's tied output head"
        )
    return params


def params_to_hf(params: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face GPT-2 tensors, named as `GPT2LMHeadModel.save_pretrained` names them."""
    tensors = params_to_tensors(params, layout(GPTConfig.from_config(fields)), fields)
    return {f"transformer.{name}": value for name, value in tensors.items()}


def hf_config(fields: Mapping[str, Any], eot_id: int) -> dict[str, Any]:
    """A GPT2Config as config.json: the model shape, the tanh GELU, and a tied head."""
    cfg = GPTConfig.from_config(fields)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_mlp or None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.ln_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def unsupported(cfg: GPTConfig) -> list[str]:
    """The model's options that a GPT-2 checkpoint cannot hold, each as 'model.field=value (why)'."""
    want = {
        "position": ("learned", "GPT-2 has learned positions only"),
        "norm": ("layernorm", "GPT-2 normalises with LayerNorm"),
        "qk_norm": (False, "GPT-2 has no QK-norm"),
        "mlp": ("gelu", "GPT-2's MLP is the tanh GELU"),
        "n_kv_head": (cfg.n_head, "GPT-2 has as many key/value heads as query heads"),
        "tie_embeddings": (True, "GPT-2 ties the output head to wte"),
        "bias": (True, "GPT-2 has biases everywhere"),
        "logit_softcap": (0.0, "GPT-2 does not soft-cap logits"),
    }
    have = {**{k: getattr(cfg, k) for k in want}, "n_kv_head": cfg.kv_heads}
    return [f"model.{k}={getattr(cfg, k)!r} ({why})" for k, (v, why) in want.items() if have[k] != v]
