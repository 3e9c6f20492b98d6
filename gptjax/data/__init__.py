"""Data: document sources -> token streams cached on disk -> deterministic batches.

    sources.py   `data.source` parsed (stdlib, files:, tfds:, pairs:, weighted mixtures) and
                 each source's documents, split into training and validation by name
    cache.py     the token cache: documents encoded once into train/val .bin files + meta.json
    batches.py   Dataset: the batch for a step as a function of (seed, step), and eval batches
    progress.py  what preparation prints (stderr, process 0): one line per source, a bar

`prepare` ties them together for a run: the run's tokenizer (see gptjax.tokenizer) and one
cached token stream per source.
"""

from __future__ import annotations

import os
from typing import Any

from gptjax.data.batches import Dataset
from gptjax.data.cache import TokenStream, token_dtype, token_streams
from gptjax.data.progress import Progress, short_path
from gptjax.data.sources import DataConfig, SourceSpec, parse_source, resolve, stdlib_files
from gptjax.layout import RunDir
from gptjax.tokenizer import Tokenizer, describe, workdir_tokenizer

__all__ = ["DataConfig", "Dataset", "SourceSpec", "TokenStream", "parse_source", "prepare", "stdlib_files",
           "token_dtype"]


def prepare(config: Any, workdir: str, *, tokenizer: Tokenizer | None = None) -> Dataset:
    """Tokenizer and token streams for `config.data.source`, built once and cached under workdir.

    Without `tokenizer`, `<workdir>/tokenizer/` is loaded, or a SentencePiece model is trained
    (config.tokenizer.vocab_size / model_type / max_chars) and saved there. A given tokenizer
    (e.g. GPT-2's, from an imported checkpoint) is used as is and saved there when none is.
    What is done is printed to stderr on process 0.
    """
    cfg = DataConfig.from_config(config.data)
    specs = [s for s in parse_source(cfg.source) if s.weight > 0]
    sources = [resolve(s, cfg) for s in specs]
    run, progress = RunDir.at(workdir), Progress()
    if tokenizer is None:
        texts = [(s.spec.weight, s.training_texts(cfg.val_fraction)) for s in sources]
        t = config.tokenizer
        tokenizer = workdir_tokenizer(short_path(run.tokenizer), int(t.vocab_size), str(t.model_type),
                                      int(t.max_chars), texts, progress.say)
    elif not os.path.isdir(run.tokenizer):
        tokenizer.save(run.tokenizer)
        progress.say(f"tokenizer: {describe(tokenizer)}, given; saved to {short_path(run.tokenizer)}")
    else:
        progress.say(f"tokenizer: {describe(tokenizer)}, given")
    cache_root = os.path.expanduser(cfg.cache_dir) or run.data_cache
    streams = [token_streams(s, tokenizer, cache_root, cfg.val_fraction, progress) for s in sources]
    return Dataset(tokenizer, [s.name for s in specs], [s.weight for s in specs],
                   [t for t, _ in streams], [v for _, v in streams])
