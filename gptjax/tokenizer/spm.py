"""SentencePiece tokenizers: a byte-fallback model trained here, with '<|endoftext|>' as its EOS piece.

Training turns normalization off, so that encoding is exact (`decode(encode(s)) == s`) and
encodings of concatenated documents concatenate. A saved model is the directory
`tokenizer.model` + tokenizer_meta.json. (This module is `spm`, not `sentencepiece`, so that
it is never taken for the `sentencepiece` package it imports.)
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece

from gptjax import storage
from gptjax.errors import UserError
from gptjax.tokenizer.base import EOT, write_meta

SPM_FILE = "tokenizer.model"
# SentencePiece writes a space as U+2581 and decodes U+2581 as a space; a literal U+2581 in the
# text is therefore encoded as its UTF-8 bytes (byte-fallback pieces) so that it survives.
_SPM_SPACE = "\u2581"
# SentencePiece skips training sentences longer than this many bytes; longer lines are cut
# into pieces of at most this many characters (4 bytes each at most in UTF-8).
_MAX_SENTENCE_BYTES = 16384
_MAX_SENTENCE_CHARS = _MAX_SENTENCE_BYTES // 4
SPM_MODEL_TYPES = ("bpe", "unigram")
_RESERVED_PIECES = 256 + 2  # byte-fallback pieces, unk and EOT
_COVERAGE = 0.9995  # share of the training text whose characters get pieces of their own


class SentencePieceTokenizer:
    """A SentencePiece model with byte fallback; '<|endoftext|>' is its (control) EOS piece."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size: int = self._sp.vocab_size()
        self.eot_id: int = self._sp.eos_id()
        if self.eot_id < 0 or self._sp.id_to_piece(self.eot_id) != EOT:
            raise UserError(f"SentencePiece model has no {EOT!r} EOS piece; train it with train_sentencepiece")
        self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPM_SPACE.encode()]
        if self._sp.unk_id() in self._space_ids:
            raise UserError("SentencePiece model lacks byte-fallback pieces; train it with train_sentencepiece")
        self._threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @functools.cached_property
    def model_type(self) -> str:
        """'bpe' or 'unigram', from the model's trainer spec (read on first use: the protobuf
        module it needs costs a short sampling run a noticeable share of its imports)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self._proto)
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

    def encode(self, text: str) -> list[int]:
        if _SPM_SPACE not in text:
            return self._sp.encode(text)
        return self._encode_with_literal_space(text)

    def _encode_with_literal_space(self, text: str) -> list[int]:
        parts = self._sp.encode(text.split(_SPM_SPACE))
        ids = parts[0]
        for part in parts[1:]:
            ids += self._space_ids + part
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = self._sp.encode(list(texts), num_threads=self._threads)
        for i, text in enumerate(texts):
            if _SPM_SPACE in text:
                out[i] = self._encode_with_literal_space(text)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids past the vocabulary (a model's padded vocabulary) read as nothing."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        pieces, start = [], 0
        for i, t in enumerate(ids):
            if t == self.eot_id:
                pieces.append(self._sp.decode(ids[start:i]))
                start = i + 1
        pieces.append(self._sp.decode(ids[start:]))
        return EOT.join(pieces)

    def save(self, directory: str) -> None:
        storage.makedirs(directory)
        storage.write_bytes(storage.join(directory, SPM_FILE), self._proto)
        write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                               "model_type": self.model_type, "model_file": SPM_FILE,
                               "fingerprint": self.fingerprint()})

    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()[:16]


def _training_sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines of the first `max_chars` characters of `texts`, long lines cut to fit SentencePiece."""
    budget = max_chars
    for text in texts:
        for line in text.splitlines():
            for i in range(0, len(line), _MAX_SENTENCE_CHARS):
                piece = line[i : i + _MAX_SENTENCE_CHARS]
                yield piece
                budget -= len(piece)
                if budget <= 0:
                    return


def _drop_rare_characters(sentences: list[str], vocab_size: int) -> list[str]:
    """Cut training lines at all but the most frequent characters (those covering 99.95% of the
    text, and at most half of the learned pieces). The rest encode as bytes; this also lets
    small vocabularies train on text with many distinct characters."""
    counts = np.bincount(np.frombuffer("".join(sentences).encode("utf-32-le", "surrogatepass"), np.uint32))
    present = np.flatnonzero(counts)
    ranked = present[np.argsort(-counts[present], kind="stable")]  # code points, most frequent first
    covered = np.cumsum(counts[ranked]) / counts.sum()
    room = max(1, (vocab_size - _RESERVED_PIECES) // 2)
    keep = min(room, int(np.searchsorted(covered, _COVERAGE)) + 1)
    rare = dict.fromkeys(ranked[keep:].tolist(), "\n")  # '\n' cannot occur: these are lines
    if not rare:
        return sentences
    return [piece for s in sentences for piece in s.translate(rare).split("\n") if piece]


def train_sentencepiece(
    texts: Iterable[str],
    directory: str,
    vocab_size: int,
    model_type: str = "bpe",
    max_chars: int = 10_000_000,
) -> SentencePieceTokenizer:
    """Train a byte-fallback SentencePiece model on the first `max_chars` characters of `texts`.

    Normalization is off ('identity', no whitespace folding, no dummy prefix) so that encoding
    is exact and encodings of concatenated documents concatenate; digits are split one by one;
    whitespace runs may be pieces (code indentation). The model is saved into `directory`.
    """
    if model_type not in SPM_MODEL_TYPES:
        raise UserError(f"tokenizer.model_type must be one of {list(SPM_MODEL_TYPES)}, got {model_type!r}")
    min_vocab = _RESERVED_PIECES + 1
    if int(vocab_size) < min_vocab:
        raise UserError(f"tokenizer.vocab_size must be at least {min_vocab} (256 byte pieces + unk + EOT + 1), "
                        f"got {vocab_size}")
    if int(max_chars) < 1:
        raise UserError(f"tokenizer.max_chars must be a positive integer, got {max_chars}")
    sentences = [s for s in _training_sentences(texts, int(max_chars)) if s]
    if not sentences:
        raise UserError("cannot train a tokenizer: the training documents contain no text")
    sentences = _drop_rare_characters(sentences, int(vocab_size))
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            vocab_size=int(vocab_size), model_type=model_type,
            byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=_MAX_SENTENCE_BYTES, input_sentence_size=0,
            unk_id=0, eos_id=1, eos_piece=EOT, bos_id=-1, pad_id=-1,
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:
        reason = " ".join(str(e).split()).rsplit("] ", 1)[-1]  # drop SentencePiece's source location
        raise UserError(f"SentencePiece training failed: {reason} "
                        "(change tokenizer.vocab_size)") from None
    tok = SentencePieceTokenizer(model.getvalue())
    tok.save(directory)
    return tok
