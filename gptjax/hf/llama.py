"""Hugging Face Llama (`LlamaForCausalLM`) <-> gptjax: config.json fields and the tensor layout.

A gptjax model with rotary positions, RMSNorm, SwiGLU and no biases computes what Llama
computes: the same RoPE convention (gptjax's `rope` rotates halves, pairing dimension i with
i + head_dim/2, as Llama's `rotate_half` does, so q and k rows need no reordering), the same
RMSNorm (`ln_eps` is `rms_norm_eps`), SwiGLU as `down(silu(gate(x)) * up(x))`, query head h
reading key/value head h // (n_head / n_kv_head). The head may be tied (`tie_word_embeddings`,
as SmolLM's) or not. Options Llama cannot hold (QK-norm, ReLU squared, GELU, LayerNorm, logit
soft-capping, biases) are refused on export; on import, a config that asks for anything gptjax
does not compute (rope_scaling, biases, another activation, a head_dim other than
hidden_size / num_attention_heads) is refused.

torch's Linear stores (out, in); gptjax's kernels are [in..., out...]: q_proj.weight (H*D, C)
<-> q_proj/kernel (C, H, D); k_proj/v_proj (K*D, C) <-> kv_proj/kernel[:, 0/1] (C, K, D), or
with K == H the fused c_attn/kernel[:, 0/1/2] (C, H, D); o_proj (C, H*D) <-> c_proj/kernel
(H, D, C); gate/up/down_proj <-> mlp/*_proj/kernel transposed; the norms' `weight` <-> `scale`;
lm_head.weight (V, C) <-> lm_head/kernel as is.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from gptjax.errors import UserError
from gptjax.hf.files import Entry, Layout, params_to_tensors, positive_float, positive_int, tensors_to_params
from gptjax.model import GPTConfig

MODEL_TYPE = "llama"
MODEL_CLASS = "LlamaForCausalLM"
NAME = "Llama"
SILU = ("silu", "swish")  # transformers' names of x * sigmoid(x)
# LlamaConfig's defaults, used for fields a config.json leaves out (as transformers does).
_HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
}
_BUFFER = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # older savers wrote it
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def rename(key: str) -> str | None:
    """A stored tensor's name; None for the rotary buffer some savers wrote."""
    return None if _BUFFER.match(key) else key


def _rope_base(hf: Mapping[str, Any], path: str) -> float:
    """rope_theta, from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    scaling = params if isinstance(params, Mapping) else hf["rope_scaling"]
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, Mapping) else scaling
        if kind != "default":
            raise UserError(f"{path}: RoPE scaling {kind!r} is not supported (gptjax's RoPE is Llama's unscaled one)")
    theta = {**hf, **(params if isinstance(params, Mapping) else {})}
    return positive_float(theta, "rope_theta", path)


def fields_from_config(hf_config: Mapping[str, Any], path: str) -> dict[str, Any]:
    """GPTConfig field values from a Llama config.json's contents (the shape, and the options that
    make a gptjax model Llama); a config gptjax cannot compute exactly is a UserError."""
    hf = {**_HF_DEFAULTS, **hf_config}
    if hf["hidden_act"] not in SILU:
        raise UserError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported; gptjax's SwiGLU gates with silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf[key]:
            raise UserError(f"{path}: {key}={hf[key]!r} is not supported (gptjax's Llama models have no biases)")
    c, h = positive_int(hf, "hidden_size", path), positive_int(hf, "num_attention_heads", path)
    if hf["head_dim"] is not None and hf["head_dim"] * h != c:
        raise UserError(f"{path}: head_dim={hf['head_dim']!r} is not supported; gptjax's head_dim is "
                        f"hidden_size / num_attention_heads ({c} / {h})")
    kv = h if hf["num_key_value_heads"] is None else positive_int(hf, "num_key_value_heads", path)
    if not isinstance(hf["tie_word_embeddings"], bool):
        raise UserError(f"{path}: tie_word_embeddings must be true or false, got {hf['tie_word_embeddings']!r}")
    return {
        "vocab_size": positive_int(hf, "vocab_size", path),
        "n_layer": positive_int(hf, "num_hidden_layers", path),
        "n_head": h,
        "n_embd": c,
        "n_mlp": positive_int(hf, "intermediate_size", path),
        "block_size": positive_int(hf, "max_position_embeddings", path),
        "ln_eps": positive_float(hf, "rms_norm_eps", path),
        "position": "rope",
        "rope_base": _rope_base(hf, path),
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "n_kv_head": kv,
        "tie_embeddings": hf["tie_word_embeddings"],
        "bias": False,
    }


def unsupported(cfg: GPTConfig) -> list[str]:
    """The model's options that a Llama checkpoint cannot hold, each as 'model.field=value (why)'."""
    want = {
        "position": ("rope", "Llama has rotary positions only"),
        "norm": ("rmsnorm", "Llama normalises with RMSNorm"),
        "qk_norm": (False, "Llama has no QK-norm"),
        "mlp": ("swiglu", "Llama's MLP is SwiGLU"),
        "bias": (False, "Llama has no biases"),
        "logit_softcap": (0.0, "Llama does not soft-cap logits"),
    }
    return [f"model.{k}={getattr(cfg, k)!r} ({why})" for k, (v, why) in want.items() if getattr(cfg, k) != v]


def _linear(path: tuple[str, ...], out_shape: tuple[int, ...], in_dim: int, slot: tuple[int, int] | None = None) -> Entry:
    """A torch Linear weight (prod(out_shape), in) <-> a kernel slice (in, *out_shape)."""
    out = int(np.prod(out_shape))
    return Entry(path, (out, in_dim), (in_dim, *out_shape),
                 to_params=lambda w: w.T.reshape(in_dim, *out_shape), to_hf=lambda k: k.reshape(in_dim, out).T,
                 slot=slot)


def layout(cfg: GPTConfig) -> Layout:
    """Hugging Face tensor name -> its gptjax parameter (see the module docstring)."""
    c, h, k, d, m, v = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    out = {
        _EMBED: Entry(("wte", "embedding"), (v, c), (v, c)),
        "model.norm.weight": Entry(("ln_f", "scale"), (c,), (c,)),
    }
    if not cfg.tie_embeddings:
        out[_HEAD] = Entry(("lm_head", "kernel"), (v, c), (v, c))
    for i in range(cfg.n_layer):
        hf, gj = f"model.layers.{i}.", f"h_{i}"
        out[f"{hf}input_layernorm.weight"] = Entry((gj, "ln_1", "scale"), (c,), (c,))
        out[f"{hf}post_attention_layernorm.weight"] = Entry((gj, "ln_2", "scale"), (c,), (c,))
        attn = f"{hf}self_attn."
        if k == h:  # gptjax fuses q, k and v into c_attn [C, 3, H, D]
            for j, name in enumerate("qkv"):
                out[f"{attn}{name}_proj.weight"] = _linear((gj, "attn", "c_attn", "kernel"), (h, d), c, slot=(1, j))
        else:
            out[f"{attn}q_proj.weight"] = _linear((gj, "attn", "q_proj", "kernel"), (h, d), c)
            for j, name in enumerate("kv"):
                out[f"{attn}{name}_proj.weight"] = _linear((gj, "attn", "kv_proj", "kernel"), (k, d), c, slot=(1, j))
        out[f"{attn}o_proj.weight"] = Entry(
            (gj, "attn", "c_proj", "kernel"), (c, h * d), (h, d, c),
            to_params=lambda w: w.T.reshape(h, d, c), to_hf=lambda p: p.reshape(h * d, c).T,
        )
        for name, (n_in, n_out) in (("gate_proj", (c, m)), ("up_proj", (c, m)), ("down_proj", (m, c))):
            out[f"{hf}mlp.{name}.weight"] = _linear((gj, "mlp", name, "kernel"), (n_out,), n_in)
    return out


def hf_to_params(tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], source: str = "the checkpoint") -> dict:
    """gptjax parameters from Llama tensors (as `LlamaForCausalLM.save_pretrained` names them);
    with a tied head, a stored lm_head.weight must equal the embedding."""
    cfg = GPTConfig.from_config(fields)
    tied_head = frozenset({_HEAD}) if cfg.tie_embeddings else frozenset()
    params = tensors_to_params(tensors, layout(cfg), source, tied_head)
    head = tensors.get(_HEAD)
    if cfg.tie_embeddings and head is not None and not (head.shape == tensors[_EMBED].shape
                                                        and np.array_equal(head, tensors[_EMBED])):
        raise UserError(f"{source}: lm_head.weight differs from {_EMBED} but config.json has tie_word_embeddings=true")
    return params


def params_to_hf(params: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Llama tensors, named as `LlamaForCausalLM.save_pretrained` names them (no lm_head when tied)."""
    return params_to_tensors(params, layout(GPTConfig.from_config(fields)), fields)


def hf_config(fields: Mapping[str, Any], eot_id: int) -> dict[str, Any]:
    """A LlamaConfig as config.json (the rope fields as transformers 4 and 5 both read them)."""
    cfg = GPTConfig.from_config(fields)
    return {
        "architectures": [MODEL_CLASS],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.ln_eps,
        "rope_theta": float(cfg.rope_base),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }
