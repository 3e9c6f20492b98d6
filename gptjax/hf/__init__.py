"""Hugging Face import and export: a `transformers` directory <-> gptjax parameters.

Two formats, each a module: `gpt2` (`GPT2LMHeadModel`: learned positions, LayerNorm, GELU,
biases, tied head: gptjax's default model) and `llama` (`LlamaForCausalLM`: RoPE, RMSNorm,
SwiGLU, no biases, any `n_kv_head`, tied or untied head). Importing reads config.json's
`model_type` and picks the format, so `init_from=hf:DIR` takes either. Exporting picks the
format that holds every option of the model; a model neither holds (QK-norm, ReLU squared,
soft-capping, RoPE with LayerNorm, ...) is refused in one line naming, for each format, the
options it cannot hold, rather than written as a model that computes something else.

A directory holds `config.json`, the weights as `model.safetensors` (or shards listed in
`model.safetensors.index.json`), and the tokenizer (`tokenizer.json`, or `vocab.json` +
`merges.txt`, or a gptjax SentencePiece model). Only safetensors are read: a pickled checkpoint
(`.bin`, `.pt`) could run code when loaded, so it is refused with a way to convert it.

    files.py  what the formats share: reading and writing directories, layouts of tensors
    gpt2.py   GPT-2's config.json and tensors
    llama.py  Llama's config.json and tensors (q/k rows reordered for RoPE's pairing)
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from gptjax import storage
from gptjax.errors import UserError
from gptjax.hf import gpt2, llama
from gptjax.hf.files import (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, absolute, check_vocab, read_json,
                             read_tensors, require_new_dir, weight_files, write_dir)
from gptjax.hf.gpt2 import hf_config, hf_to_params, params_to_hf  # GPT-2's, as before the package
from gptjax.model import GPTConfig
from gptjax.tokenizer import Tokenizer, load_tokenizer

FORMATS: dict[str, ModuleType] = {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama}
# The model fields an imported checkpoint decides (over the run's config.model); a format's
# reader sets those it stores, the rest are GPTConfig's defaults (GPT-2's).
ARCHITECTURE_FIELDS = ("position", "rope_base", "norm", "qk_norm", "mlp", "n_kv_head", "tie_embeddings", "bias",
                       "logit_softcap")

__all__ = ["CONFIG_FILE", "FORMATS", "WEIGHTS_FILE", "WEIGHTS_INDEX_FILE", "HFDir", "absolute", "export_format",
           "export_hf_dir", "hf_config", "hf_to_params", "imported_fields", "load_hf_dir", "load_init_from",
           "pad_vocab", "params_to_hf", "read_dir", "read_hf_config", "require_new_dir"]


@dataclasses.dataclass(frozen=True)
class HFDir:
    """A Hugging Face model directory with its config.json read (`read_dir`): what a run's
    `init_from=hf:DIR` resolves to, before its weights are read (`load_init_from`)."""

    directory: str  # absolute (or a URL)
    fmt: ModuleType  # the format of its model_type: gpt2 or llama
    fields: dict[str, Any]  # the GPTConfig field values config.json gives

    @property
    def model_fields(self) -> dict[str, Any]:
        """`fields` with every architecture field set (`imported_fields`): the shape a run that
        imports it trains."""
        return imported_fields(self.fields)


def read_dir(directory: str) -> HFDir:
    """`directory` (a GPT-2 or Llama directory) with its config.json read; a config gptjax cannot
    compute exactly is a UserError."""
    directory = absolute(directory)
    exists = storage.exists(directory)  # one look at a bucket or disk, for the check and its message
    if not exists or storage.is_file(directory):
        what = "is not a directory" if exists else "does not exist"
        raise UserError(f"{directory} {what}; expected a Hugging Face model directory (GPT-2 or Llama)")
    path = storage.join(directory, CONFIG_FILE)
    if not storage.is_file(path):
        raise UserError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face model directory (GPT-2 or Llama)")
    hf = read_json(path, "a Hugging Face model config")
    model_type = hf.get("model_type", gpt2.MODEL_TYPE)
    if model_type not in FORMATS:
        raise UserError(f"{path}: model_type is {model_type!r}; only {' and '.join(map(repr, FORMATS))} "
                        "checkpoints can be imported")
    fmt = FORMATS[model_type]
    fields = fmt.fields_from_config(hf, path)
    try:
        GPTConfig(**fields)  # n_head must divide n_embd, etc.
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return HFDir(directory, fmt, fields)


def load_init_from(imported: HFDir, cfg: GPTConfig) -> tuple[dict, Tokenizer]:
    """The parameters (fp32 numpy, the embedding padded to `cfg`'s rows: `pad_vocab`) and the
    tokenizer of a run's `init_from=hf:DIR` (read by resolve: `imported`), for a run of model
    `cfg` that starts from them."""
    params, tokenizer = _weights_and_tokenizer(imported)
    return pad_vocab(params, cfg), tokenizer


def read_hf_config(directory: str) -> dict[str, Any]:
    """GPTConfig field values from `directory`/config.json (a GPT-2 or Llama config); a config
    gptjax cannot compute exactly is a UserError. A GPT-2 config gives the shape fields alone
    (its architecture is GPTConfig's default); `imported_fields` completes them."""
    return read_dir(directory).fields


def imported_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` of an imported checkpoint with every architecture field set (GPTConfig's default
    where the format leaves it out), so that a run's config.model cannot change what the
    imported weights compute (e.g. RoPE over GPT-2's learned positions)."""
    defaults = {f: getattr(GPTConfig, f) for f in ARCHITECTURE_FIELDS}
    return {**defaults, **fields}


def load_hf_dir(directory: str) -> tuple[dict[str, Any], dict, Tokenizer]:
    """(GPTConfig field values, fp32 numpy parameters, tokenizer) from a Hugging Face GPT-2 or
    Llama directory. The tokenizer is the directory's `tokenizer.json` (or vocab.json +
    merges.txt), or a SentencePiece model that `export_hf_dir` wrote from a SentencePiece run."""
    d = read_dir(directory)
    params, tokenizer = _weights_and_tokenizer(d)
    return d.fields, params, tokenizer


def _weights_and_tokenizer(d: HFDir) -> tuple[dict, Tokenizer]:
    """The fp32 numpy parameters and the tokenizer of a directory whose config.json is read."""
    files = weight_files(d.directory, d.fmt.NAME, d.fmt.MODEL_CLASS)
    tokenizer = load_tokenizer(d.directory)
    check_vocab(tokenizer, d.fields["vocab_size"], f"{d.directory}: ", "config.json's")
    params = d.fmt.hf_to_params(read_tensors(files, d.fmt.rename), d.fields, source=d.directory)
    return params, tokenizer


def pad_vocab(params: dict, cfg: GPTConfig) -> dict:
    """Imported parameters for `cfg`, whose embedding may have padded rows (`model.vocab_multiple`):
    zero rows appended up to `cfg.padded_vocab` (never in the loss, never sampled); parameters
    that have them already are returned as they are. Export leaves them behind
    (`files.params_to_tensors`)."""
    table = params["wte"]["embedding"]
    if table.shape[0] >= cfg.padded_vocab:
        return params
    rows = np.zeros((cfg.padded_vocab, table.shape[1]), table.dtype)
    rows[: table.shape[0]] = table
    return {**params, "wte": {**params["wte"], "embedding": rows}}


def export_format(model_fields: Mapping[str, Any]) -> str:
    """The model_type of the format that holds the model exactly ('gpt2' or 'llama'); a model
    neither holds is a UserError naming, for each format, the options it cannot hold."""
    cfg = GPTConfig.from_config(model_fields)
    refused = {name: fmt.unsupported(cfg) for name, fmt in FORMATS.items()}
    for name, options in refused.items():
        if not options:
            return name
    reasons = "; ".join(f"{FORMATS[name].NAME} cannot hold {', '.join(options)}" for name, options in refused.items())
    raise UserError(f"no Hugging Face format holds this model ({reasons}); export refuses rather than write "
                    "a model that computes something else")


def export_hf_dir(model_fields: Mapping[str, Any], params: Mapping[str, Any], tokenizer: Tokenizer,
                  directory: str) -> str:
    """Write a Hugging Face directory that transformers loads (`GPT2LMHeadModel` or
    `LlamaForCausalLM`: the format `export_format` picks), and return the format's model_type.

    Files: config.json, model.safetensors (fp32, named as `save_pretrained` names them),
    generation_config.json, and the tokenizer's own files. A BPE tokenizer (`tokenizer.json`)
    writes a directory `AutoTokenizer.from_pretrained` loads; a SentencePiece tokenizer writes
    tokenizer.model + tokenizer_meta.json, which gptjax (`load_tokenizer`, `load_hf_dir`) and
    `sentencepiece` read but `AutoTokenizer` does not. An option the format cannot hold is a
    UserError naming it. `directory` (local or a URL) must be new or empty so that no stale file
    is mixed in.
    """
    directory = require_new_dir(directory)
    fields = dict(model_fields)
    fmt = FORMATS[export_format(fields)]
    check_vocab(tokenizer, int(fields["vocab_size"]), "", "the model's")
    write_dir(fmt.params_to_hf(params, fields), fmt.hf_config(fields, tokenizer.eot_id), tokenizer, directory)
    return fmt.MODEL_TYPE
