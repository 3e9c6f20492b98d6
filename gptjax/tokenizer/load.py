"""Reading a saved tokenizer directory (gptjax's, or a Hugging Face GPT-2 one) back, and a
tokenizer given by `tokenizer.path` (a tokenizer.json, a directory, or a SentencePiece model)."""

from __future__ import annotations

import json
import os

from gptjax import storage
from gptjax.errors import UserError
from gptjax.tokenizer.base import META_FILE, Tokenizer
from gptjax.tokenizer.gpt2_bpe import GPT2BPETokenizer
from gptjax.tokenizer.spm import SPM_FILE, SentencePieceTokenizer


def tokenizer_saved(directory: str) -> bool:
    """Whether `directory` holds a saved tokenizer (a local directory, or a URL with its meta file)."""
    if storage.is_url(directory):
        return storage.exists(storage.join(directory, META_FILE))
    return os.path.isdir(directory)


def load_tokenizer(directory: str) -> Tokenizer:
    """Load what `save` wrote; a Hugging Face GPT-2 tokenizer directory also loads."""
    meta_path = storage.join(directory, META_FILE)
    if not storage.is_file(meta_path):
        if any(storage.is_file(storage.join(directory, f)) for f in ("tokenizer.json", "vocab.json")):
            return GPT2BPETokenizer.from_files(directory)
        raise UserError(f"{directory} is not a tokenizer directory: expected {META_FILE} (written by gptjax) "
                        "or tokenizer.json / vocab.json + merges.txt (Hugging Face GPT-2)")
    try:
        meta = json.loads(storage.read_text(meta_path))
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path} is not a valid tokenizer meta file (expected JSON with 'kind')") from None
    if kind == SentencePieceTokenizer.kind:
        path = storage.join(directory, meta.get("model_file", SPM_FILE))
        if not storage.is_file(path):
            raise UserError(f"{directory}: {META_FILE} names a SentencePiece model but {path} is missing")
        tok: Tokenizer = SentencePieceTokenizer(storage.read_bytes(path))
    elif kind == GPT2BPETokenizer.kind:
        tok = GPT2BPETokenizer.from_files(directory)
    else:
        raise UserError(f"{meta_path}: unknown tokenizer kind {kind!r}; allowed: 'sentencepiece', 'gpt2'")
    if tok.vocab_size != meta.get("vocab_size", tok.vocab_size) or tok.eot_id != meta.get("eot_id", tok.eot_id):
        raise UserError(f"{directory}: the tokenizer files do not match {META_FILE} "
                        f"(vocab_size {tok.vocab_size} vs {meta.get('vocab_size')}); save the tokenizer again")
    return tok


def describe(tok: Tokenizer) -> str:
    """One line on what a tokenizer is, e.g. 'SentencePiece bpe, 2,048 pieces'."""
    if tok.kind == SentencePieceTokenizer.kind:
        return f"SentencePiece {tok.model_type}, {tok.vocab_size:,} pieces"
    return f"GPT-2 byte-level BPE, {tok.vocab_size:,} ids"


def given_exists(path: str) -> bool:
    """Whether the file or directory `tokenizer.path` names is there."""
    return storage.exists(path if storage.is_url(path) else os.path.expanduser(path))


def load_given(path: str) -> Tokenizer:
    """The tokenizer `tokenizer.path` names: a Hugging Face tokenizer.json file (GPT-2's, say), a
    directory holding one (or a gptjax tokenizer), or a SentencePiece .model file trained by gptjax."""
    path = path if storage.is_url(path) else os.path.expanduser(path)
    allowed = ("a Hugging Face tokenizer.json (e.g. GPT-2's: hf download openai-community/gpt2 tokenizer.json "
               "--local-dir data/gpt2), a directory holding one, or a SentencePiece .model file")
    if not storage.is_url(path) and os.path.isdir(path):
        return load_tokenizer(path)
    if not storage.is_file(path):
        raise UserError(f"tokenizer.path {path!r} does not exist; give {allowed}")
    if path.endswith(".json"):
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
        except Exception as e:  # the tokenizers library raises its own Exception
            raise UserError(f"tokenizer.path {path!r} is not a Hugging Face tokenizer.json ({' '.join(str(e).split())})"
                            ) from None
        if json.loads(tok.to_str())["model"]["type"] != "BPE":
            raise UserError(f"tokenizer.path {path!r} holds a {json.loads(tok.to_str())['model']['type']} model; "
                            "gptjax reads byte-level BPE tokenizer.json files (GPT-2's kind)")
        return GPT2BPETokenizer(tok)
    if path.endswith(".model"):
        return SentencePieceTokenizer(storage.read_bytes(path))
    raise UserError(f"tokenizer.path {path!r}: unknown kind of file; give {allowed}")
