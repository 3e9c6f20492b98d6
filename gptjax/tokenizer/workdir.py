"""A run's tokenizer: the one saved in its workdir, or a SentencePiece model trained there on the
run's training documents (config.tokenizer's settings). Training writes into a temporary
directory that is renamed into place (or, for a URL, uploaded meta file last), so a reader never
sees half a tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable, Iterable, Iterator, Sequence

from gptjax import storage
from gptjax.errors import UserError
from gptjax.tokenizer.base import META_FILE, Tokenizer
from gptjax.tokenizer.load import describe, load_tokenizer, tokenizer_saved
from gptjax.tokenizer.spm import train_sentencepiece


def training_texts(sources: Sequence[tuple[float, Iterable[str]]], max_chars: int) -> Iterator[str]:
    """Texts to train on from weighted sources, each contributing max_chars in proportion to its weight."""
    total_weight = sum(weight for weight, _ in sources)
    for weight, texts in sources:
        budget = max_chars * weight / total_weight
        for text in texts:
            yield text
            budget -= len(text)
            if budget <= 0:
                break


def workdir_tokenizer(directory: str, vocab_size: int, model_type: str, max_chars: int,
                      sources: Sequence[tuple[float, Iterable[str]]], say: Callable[[str], None]) -> Tokenizer:
    """The tokenizer saved in `directory`, else a SentencePiece model trained and saved there.

    The settings are config.tokenizer's; `sources` are (weight, training texts) pairs, read only
    when a model is trained; `say` hears one line on what was done.
    """
    if tokenizer_saved(directory):
        tok = load_tokenizer(directory)
        if tok.kind == "sentencepiece" and (tok.vocab_size, tok.model_type) != (vocab_size, model_type):
            raise UserError(f"{directory} holds a {tok.model_type} tokenizer of {tok.vocab_size} pieces but the config "
                            f"asks for {model_type} with {vocab_size}; use a new workdir, or delete that directory "
                            "to retrain")
        say(f"tokenizer: {describe(tok)}, loaded from {directory}")
        return tok
    parent = None if storage.is_url(directory) else os.path.dirname(directory)
    if parent is not None:
        os.makedirs(parent or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    read = 0

    def counted(texts: Iterable[str]) -> Iterator[str]:
        nonlocal read
        for text in texts:
            read += len(text)
            yield text

    say(f"tokenizer: training SentencePiece {model_type} with {vocab_size:,} pieces "
        f"on up to {max_chars:,} characters of the training documents")
    start = time.perf_counter()
    try:
        tok = train_sentencepiece(counted(training_texts(sources, max_chars)), tmp, vocab_size, model_type, max_chars)
        if parent is None:
            storage.upload_dir(tmp, directory, last=META_FILE)
        else:
            try:
                os.rename(tmp, directory)
            except OSError:  # another process saved one first: use that (training is deterministic)
                return load_tokenizer(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"tokenizer: trained on {min(read, max_chars):,} characters in {time.perf_counter() - start:.1f} s, "
        f"saved to {directory}")
    return tok
