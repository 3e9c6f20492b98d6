"""The model a run trains, worked out once by `resolve_model` (for `gptjax.run.resolve`):

- the shape is `config.model`, with an `init_from` checkpoint's shape fields over it (an
  import sets every architecture option);
- `vocab_size` 0 means the tokenizer's: the run directory's saved tokenizer, else the one
  `tokenizer.path` names, else the size a tokenizer will be trained to (`tokenizer.vocab_size`);
- a run that resumes keeps the shape its checkpoints were saved with (`SHAPE_FIELDS`).

It reads only small files: the run's tokenizer or a given one. `resolve` reads the import's
config.json (`gptjax.hf.read_dir`); its weights are read by the prepare stage
(`gptjax.hf.load_init_from`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gptjax import schema
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.model import GPTConfig
from gptjax.tokenizer import Tokenizer, given_exists, load_given, load_tokenizer, tokenizer_saved

# The model fields that fix the parameter tree (names and shapes).
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd", "n_mlp", "block_size",
                "position", "norm", "qk_norm", "mlp", "n_kv_head", "tie_embeddings", "bias", "vocab_multiple")


def resolve_model(s: schema.Sections, imported: Mapping[str, Any] | None, run_dir: RunDir | None,
                  saved: Mapping[str, Any] | None = None) -> tuple[GPTConfig, Tokenizer | None]:
    """The run's GPTConfig, and its tokenizer where one exists already (None: trained, or read
    from init_from, when the run is prepared). `imported`: the model fields of init_from's
    config.json (`gptjax.hf.HFDir.model_fields`), None without one. `run_dir` None: no run
    directory is read, and the vocabulary comes from model.vocab_size, the import or
    tokenizer.vocab_size. `saved`: the config the run's checkpoints were made with, whose shape
    this one must keep."""
    tokenizer = None
    if run_dir is not None and tokenizer_saved(run_dir.tokenizer):
        tokenizer = load_tokenizer(run_dir.tokenizer)
    elif s.tokenizer.path and not imported and (given_exists(s.tokenizer.path) or
                                                 s.model["vocab_size"] == schema.MODEL_VOCAB_FROM_TOKENIZER):
        tokenizer = load_given(s.tokenizer.path)  # a given tokenizer (GPT-2's, say): read now, it sizes the model
    if tokenizer is not None:
        tokenizer_vocab = tokenizer.vocab_size
    else:  # the size a tokenizer will be trained to; an imported one comes with its model's size
        tokenizer_vocab = None if imported else s.tokenizer.vocab_size
    gpt = model_config(s.model, tokenizer_vocab, imported, fit=run_dir is not None)
    if s.train.seq_len > gpt.block_size:
        raise UserError(f"train.seq_len={s.train.seq_len} is longer than model.block_size={gpt.block_size}")
    if saved is not None:
        check_same_shape(run_dir, saved, gpt)
    return gpt, tokenizer


def model_config(
    model: Mapping[str, Any], tokenizer_vocab: int | None, imported: Mapping[str, Any] | None = None, fit: bool = True
) -> GPTConfig:
    """The run's GPTConfig: `config.model`, with an imported checkpoint's shape fields over it,
    and `vocab_size` 0 meaning the tokenizer's (`tokenizer_vocab`). The one place that rule lives.

    `fit`: the model's vocabulary must hold the tokenizer's (off where `tokenizer_vocab` only
    stands in, as without a run directory). `tokenizer_vocab` None: not known yet (an imported
    tokenizer, checked when it is read).
    """
    fields = {**dict(model), **dict(imported or {})}
    if fields["vocab_size"] < 0:
        raise UserError(f"model.vocab_size must be >= 0 (0: the tokenizer's), got {fields['vocab_size']}")
    if fields["vocab_size"] == schema.MODEL_VOCAB_FROM_TOKENIZER:
        fields["vocab_size"] = tokenizer_vocab
    gpt = GPTConfig.from_config(fields)
    if fit and tokenizer_vocab is not None and gpt.vocab_size < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={gpt.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); use 0 to take the tokenizer's"
        )
    return gpt


def check_same_shape(run_dir: RunDir | None, saved: Mapping[str, Any], gpt: GPTConfig) -> None:
    """The model shape is the one the run's checkpoints (its saved config, `saved`) were made with."""
    mine, theirs = model_shape(gpt), model_shape(saved["model"])
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        where = run_dir.root if run_dir is not None else "the run directory"
        raise UserError(
            f"workdir {where!r} holds a checkpoint of a different model shape "
            f"(field: (saved, requested) = {diff}); use a new --workdir or the saved shape"
        )


def model_shape(model: Any) -> dict[str, Any]:
    """The fields of a model config (a GPTConfig or config.model) that fix parameter shapes; a
    saved config without one of them (a run from before it existed) has its default."""
    if not hasattr(model, "keys"):
        return {k: getattr(model, k) for k in SHAPE_FIELDS}
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    return {k: model[k] if k in model else defaults[k] for k in SHAPE_FIELDS}

