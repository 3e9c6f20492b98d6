"""Hugging Face GPT-2 import and export: a `transformers` directory <-> gptjax parameters.

The directory may be local or a gs:// URL: weights in a bucket are copied to a temporary
local file one at a time (safetensors memory-maps a local file), and an export to a bucket is
written locally first and then uploaded.

A Hugging Face GPT-2 directory holds `config.json`, the weights as `model.safetensors` (or
shards listed in `model.safetensors.index.json`), and the tokenizer as `tokenizer.json` or
`vocab.json` + `merges.txt`. Only safetensors are read: a pickled checkpoint (`.bin`, `.pt`)
could run code when loaded, so it is refused with a way to convert it.

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

import contextlib
import json
import os
import posixpath
import re
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

from gptjax import storage
from gptjax.errors import UserError
from gptjax.model import GPTConfig
from gptjax.tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
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
    "tie_word_embeddings": (True, "gptjax ties the output head to the token embedding"),
}
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_text(path))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); expected {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; expected {what}")
    return data


def read_hf_config(directory: str) -> dict[str, Any]:
    """GPTConfig field values (vocab_size, n_layer, n_head, n_embd, n_mlp, block_size, ln_eps)
    from `directory`/config.json; a config gptjax cannot compute exactly is a UserError."""
    directory = absolute(directory)
    path = storage.join(directory, CONFIG_FILE)
    if not storage.is_file(path):
        raise UserError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face GPT-2 directory")
    hf = {**_HF_DEFAULTS, **_read_json(path, "a Hugging Face GPT-2 config")}
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type is {hf['model_type']!r}; only 'gpt2' checkpoints can be imported")
    if hf["activation_function"] not in TANH_GELUS:
        raise UserError(
            f"{path}: activation_function {hf['activation_function']!r} is not supported; "
            f"gptjax's MLP computes the tanh GELU ({', '.join(TANH_GELUS)})"
        )
    for key, (want, why) in _UNSUPPORTED.items():
        if key in hf and hf[key] != want:
            raise UserError(f"{path}: {key}={hf[key]!r} is not supported ({why})")

    def integer(key: str) -> int:
        value = hf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{path}: {key} must be a positive integer, got {value!r}")
        return value

    n_inner = 0 if hf["n_inner"] is None else integer("n_inner")
    eps = hf["layer_norm_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise UserError(f"{path}: layer_norm_epsilon must be a positive number, got {eps!r}")
    fields = {
        "vocab_size": integer("vocab_size"),
        "n_layer": integer("n_layer"),
        "n_head": integer("n_head"),
        "n_embd": integer("n_embd"),
        "n_mlp": n_inner,
        "block_size": integer("n_positions"),
        "ln_eps": float(eps),
    }
    try:
        GPTConfig(**fields)  # n_head must divide n_embd, etc.
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return fields


def _layout(cfg: GPTConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
    """Hugging Face tensor name (no prefix) -> (gptjax param path, HF shape, gptjax shape)."""
    c, h, d, m = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.mlp_dim
    out: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]] = {
        "wte.weight": (("wte", "embedding"), (cfg.vocab_size, c), (cfg.vocab_size, c)),
        "wpe.weight": (("wpe", "embedding"), (cfg.block_size, c), (cfg.block_size, c)),
        "ln_f.weight": (("ln_f", "scale"), (c,), (c,)),
        "ln_f.bias": (("ln_f", "bias"), (c,), (c,)),
    }
    for i in range(cfg.n_layer):
        hf, gj = f"h.{i}.", f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{hf}{ln}.weight"] = ((gj, ln, "scale"), (c,), (c,))
            out[f"{hf}{ln}.bias"] = ((gj, ln, "bias"), (c,), (c,))
        out[f"{hf}attn.c_attn.weight"] = ((gj, "attn", "c_attn", "kernel"), (c, 3 * c), (c, 3, h, d))
        out[f"{hf}attn.c_attn.bias"] = ((gj, "attn", "c_attn", "bias"), (3 * c,), (3, h, d))
        out[f"{hf}attn.c_proj.weight"] = ((gj, "attn", "c_proj", "kernel"), (c, c), (h, d, c))
        out[f"{hf}attn.c_proj.bias"] = ((gj, "attn", "c_proj", "bias"), (c,), (c,))
        out[f"{hf}mlp.c_fc.weight"] = ((gj, "mlp", "c_fc", "kernel"), (c, m), (c, m))
        out[f"{hf}mlp.c_fc.bias"] = ((gj, "mlp", "c_fc", "bias"), (m,), (m,))
        out[f"{hf}mlp.c_proj.weight"] = ((gj, "mlp", "c_proj", "kernel"), (m, c), (m, c))
        out[f"{hf}mlp.c_proj.bias"] = ((gj, "mlp", "c_proj", "bias"), (c,), (c,))
    return out


def _weight_files(directory: str) -> list[str]:
    """The safetensors files of `directory`; a directory with only pickled weights is refused."""
    single = storage.join(directory, WEIGHTS_FILE)
    if storage.is_file(single):
        return [single]
    index_path = storage.join(directory, WEIGHTS_INDEX_FILE)
    if storage.is_file(index_path):
        weight_map = _read_json(index_path, "a safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no 'weight_map' naming the shard files")
        files = [storage.join(directory, name) for name in sorted(set(weight_map.values()))]
        missing = [posixpath.basename(f) for f in files if not storage.is_file(f)]
        if missing:
            raise UserError(f"{index_path} names shard(s) missing from {directory}: {missing}")
        return files
    pickled = sorted(posixpath.basename(p) for pattern in _PICKLED
                     for p in storage.glob_files(storage.join(directory, pattern)))
    if pickled:
        raise UserError(
            f"{directory} holds PyTorch pickle weights ({', '.join(pickled)}) but no {WEIGHTS_FILE}; "
            "gptjax reads only safetensors, because loading a pickle can run arbitrary code. "
            "Convert once where transformers and torch are installed: "
            f"GPT2LMHeadModel.from_pretrained('{directory}').save_pretrained('{directory}', safe_serialization=True)"
        )
    raise UserError(f"{directory} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}): no GPT-2 weights to import")


def _read_tensors(files: list[str]) -> dict[str, np.ndarray]:
    """Weights by name, `transformer.` prefix stripped, fp32; mask buffers skipped; nothing unpickled."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with _local_file(path) as local, safe_open(local, framework="np") as f:
                for key in f.keys():
                    name = key.removeprefix("transformer.")
                    if _BUFFER.match(name):
                        continue
                    if name in tensors:
                        raise UserError(f"{path}: tensor {name!r} appears twice (with and without 'transformer.')")
                    tensors[name] = np.asarray(f.get_tensor(key), np.float32)
        except SafetensorError as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors


@contextlib.contextmanager
def _local_file(path: str) -> Iterator[str]:
    """`path` itself, or for a URL a temporary local copy, removed afterwards."""
    if not storage.is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gptjax-hf-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        storage.copy_file(path, local)
        yield local


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def hf_to_params(tensors: Mapping[str, np.ndarray], fields: Mapping[str, Any], source: str = "the checkpoint") -> dict:
    """gptjax parameters from Hugging Face GPT-2 tensors (names without `transformer.`)."""
    cfg = GPTConfig.from_config(fields)
    layout = _layout(cfg)
    names = {k for k in tensors if not _BUFFER.match(k)}  # the buffers, if a caller kept them
    missing = sorted(set(layout) - names, key=list(layout).index)
    if missing:
        first = missing[0]
        raise UserError(
            f"{source} lacks {len(missing)} tensor(s) that config.json implies, first {first!r} "
            f"(expected shape {_shape(layout[first][1])}); config.json and the weights disagree"
        )
    extra = sorted(names - set(layout) - {"lm_head.weight"})
    if extra:
        raise UserError(
            f"{source} has tensor(s) that config.json does not imply: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}; config.json and the weights disagree"
        )
    params: dict = {}
    for name, (path, hf_shape, shape) in layout.items():
        value = tensors[name]
        if value.shape != hf_shape:
            raise UserError(
                f"{source}: tensor {name!r} has shape {_shape(value.shape)} but config.json implies "
                f"{_shape(hf_shape)}; config.json and the weights disagree"
            )
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value.reshape(shape)
    head = tensors.get("lm_head.weight")
    if head is not None and not (head.shape == tensors["wte.weight"].shape and np.array_equal(head, tensors["wte.weight"])):
        raise UserError(
            f"{source}: lm_head.weight differs from wte.weight; gptjax supports only GPT-2's tied output head"
        )
    return params


def pad_vocab(params: dict, cfg: GPTConfig) -> dict:
    """Imported parameters for a model with padded vocabulary rows (`model.vocab_multiple`):
    the embedding gets zero rows up to `cfg.padded_vocab` (never in the loss, never sampled);
    parameters that already have them, or a model without them, are returned as they are."""
    table = params["wte"]["embedding"]
    if table.shape[0] >= cfg.padded_vocab:
        return params
    padded = np.zeros((cfg.padded_vocab, table.shape[1]), table.dtype)
    padded[: table.shape[0]] = table
    return {**params, "wte": {**params["wte"], "embedding": padded}}


def load_hf_dir(directory: str) -> tuple[dict[str, Any], dict, Tokenizer]:
    """(GPTConfig field values, fp32 numpy parameters, tokenizer) from a Hugging Face GPT-2 directory.

    The tokenizer is GPT-2's byte-level BPE (or, for a directory written by `export_hf_dir`
    from a SentencePiece run, that SentencePiece model).
    """
    directory = absolute(directory)
    if not (storage.exists(directory) and not storage.is_file(directory)):
        raise UserError(f"{directory} is not a directory; expected a Hugging Face GPT-2 directory")
    fields = read_hf_config(directory)
    files = _weight_files(directory)
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > fields["vocab_size"]:
        raise UserError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size "
            f"is {fields['vocab_size']}; the embedding has no row for the extra ids"
        )
    params = hf_to_params(_read_tensors(files), fields, source=directory)
    return fields, params, tokenizer


def params_to_hf(params: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Hugging Face GPT-2 tensors, named as `GPT2LMHeadModel.save_pretrained` names them."""
    cfg = GPTConfig.from_config(fields)
    out: dict[str, np.ndarray] = {}
    for name, (path, hf_shape, shape) in _layout(cfg).items():
        node: Any = params
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                raise UserError(f"the parameters lack {'/'.join(path)} (model shape {dict(fields)})")
            node = node[part]
        value = np.asarray(node, np.float32)
        if name == "wte.weight" and value.shape == (cfg.padded_vocab, cfg.n_embd):
            value = value[: cfg.vocab_size]  # padded rows (model.vocab_multiple) stay behind
        if value.shape != shape:
            raise UserError(
                f"parameter {'/'.join(path)} has shape {_shape(value.shape)} but the model config implies {_shape(shape)}"
            )
        out[f"transformer.{name}"] = np.ascontiguousarray(value.reshape(hf_shape))
    return out


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


def absolute(directory: str) -> str:
    """A local path made absolute; a URL as given."""
    return directory.rstrip("/") if storage.is_url(directory) else os.path.abspath(os.path.expanduser(directory))


def require_new_dir(directory: str) -> str:
    """The absolute path (or URL) of `directory`, which must not exist or be empty (no stale
    files mix in)."""
    directory = absolute(directory)
    if storage.is_url(directory):
        taken = storage.exists(directory)  # a prefix exists while any object lies under it
    else:
        taken = os.path.exists(directory) and (not os.path.isdir(directory) or bool(os.listdir(directory)))
    if taken:
        raise UserError(f"{directory} already exists and is not an empty directory; choose a new output directory")
    return directory


def export_hf_dir(model_fields: Mapping[str, Any], params: Mapping[str, Any], tokenizer: Tokenizer, directory: str) -> None:
    """Write a Hugging Face GPT-2 directory that `GPT2LMHeadModel.from_pretrained` loads.

    Files: config.json, model.safetensors (fp32, `transformer.`-prefixed names, no lm_head:
    it is tied, as `save_pretrained` writes it), generation_config.json, and the tokenizer's
    own files. A GPT-2 BPE tokenizer writes a directory `AutoTokenizer.from_pretrained` loads;
    a SentencePiece tokenizer writes tokenizer.model + tokenizer_meta.json, which gptjax
    (`load_tokenizer`, `load_hf_dir`) and `sentencepiece` read but `AutoTokenizer` does not.
    `directory` (local or a URL) must be new or empty so that no stale file is mixed in.
    """
    directory = require_new_dir(directory)
    fields = dict(model_fields)
    if tokenizer.vocab_size > int(fields["vocab_size"]):
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {fields['vocab_size']}"
        )
    tensors = params_to_hf(params, fields)
    config = hf_config(fields, tokenizer.eot_id)
    if storage.is_url(directory):
        with tempfile.TemporaryDirectory(prefix="gptjax-hf-") as local:
            _write_hf_dir(tensors, config, tokenizer, local)
            for name in sorted(os.listdir(local)):
                storage.copy_file(os.path.join(local, name), storage.join(directory, name))
        return
    os.makedirs(directory, exist_ok=True)
    _write_hf_dir(tensors, config, tokenizer, directory)


def _write_hf_dir(tensors: dict[str, np.ndarray], config: dict[str, Any], tokenizer: Tokenizer, directory: str) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}, f, indent=2)
    tokenizer.save(directory)
