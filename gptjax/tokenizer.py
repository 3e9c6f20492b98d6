"""Tokenizers: SentencePiece (trained here) and GPT-2 byte-level BPE behind one small interface.

Both turn any Unicode text into ids and back exactly (`decode(encode(s)) == s`), both have an
end-of-text id that joins documents in the token streams and stops sampling, and neither turns
the *text* '<|endoftext|>' inside a document into that id: only the data pipeline inserts it.
`save` writes a directory that `load_tokenizer` reads back; the GPT-2 directory is also a
Hugging Face `GPT2TokenizerFast` directory, so `transformers.AutoTokenizer` can load it.
`workdir_tokenizer` gives a run its tokenizer: the one saved in the run, or one trained on
the run's training documents. Directories may be URLs (gs://...): files go through etils.epath,
and `tokenizer_meta.json` is written last, so a directory with it is complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
from etils import epath
import sentencepiece as spm

from gptjax.errors import UserError

if TYPE_CHECKING:
    import tokenizers

EOT = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"
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


class Tokenizer(Protocol):
    """What the rest of gptjax needs from a tokenizer."""

    kind: str  # 'sentencepiece' | 'gpt2'
    vocab_size: int
    eot_id: int  # end of text: joins documents, default stop token for sampling

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no end-of-text id added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once, on all cores."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; the end-of-text id reads as '<|endoftext|>', ids past the vocabulary as nothing."""

    def save(self, directory: str) -> None:
        """Write the tokenizer's files and tokenizer_meta.json into `directory`."""

    def fingerprint(self) -> str:
        """A short hash of the vocabulary and rules: equal fingerprints encode equally."""


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _write_meta(directory: str, meta: dict) -> None:
    epath.Path(directory, META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _upload(local: str, directory: str) -> None:
    """Copy the files of a local directory into `directory` (a URL), META_FILE last."""
    dest = epath.Path(directory)
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(local), key=lambda n: n == META_FILE):
        (dest / name).write_bytes(epath.Path(local, name).read_bytes())


@contextlib.contextmanager
def _local_dir(directory: str) -> Iterator[str]:
    """A local directory to write `directory`'s files into: itself, or for a URL a temporary
    one whose files are uploaded when the block ends without an error."""
    if not _is_url(directory):
        os.makedirs(directory, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="gptjax-tokenizer-") as local:
        yield local
        _upload(local, directory)


@contextlib.contextmanager
def _local_copy(directory: str, names: Sequence[str]) -> Iterator[str]:
    """A local directory holding `names` from `directory` (itself when it is local)."""
    if not _is_url(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="gptjax-tokenizer-") as local:
        for name in names:
            epath.Path(local, name).write_bytes(epath.Path(directory, name).read_bytes())
        yield local


def tokenizer_saved(directory: str) -> bool:
    """Whether `directory` holds a saved tokenizer (a local directory, or a URL with its meta file)."""
    return epath.Path(directory, META_FILE).exists() if _is_url(directory) else os.path.isdir(directory)


class SentencePieceTokenizer:
    """A SentencePiece model with byte fallback; '<|endoftext|>' is its (control) EOS piece."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.vocab_size: int = self._sp.vocab_size()
        self.eot_id: int = self._sp.eos_id()
        if self.eot_id < 0 or self._sp.id_to_piece(self.eot_id) != EOT:
            raise UserError(f"SentencePiece model has no {EOT!r} EOS piece; train it with train_sentencepiece")
        self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPM_SPACE.encode()]
        if self._sp.unk_id() in self._space_ids:
            raise UserError("SentencePiece model lacks byte-fallback pieces; train it with train_sentencepiece")
        self._threads = os.cpu_count() or 1

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
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
        epath.Path(directory, SPM_FILE).write_bytes(self._proto)
        _write_meta(directory, {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
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
        spm.SentencePieceTrainer.train(
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


class GPT2BPETokenizer:
    """Byte-level BPE exactly as Hugging Face's GPT-2, on the `tokenizers` library."""

    kind = "gpt2"

    def __init__(self, tok: tokenizers.Tokenizer):
        if tok.token_to_id(EOT) is None:
            tok.add_special_tokens([EOT])
        self._tok = tok
        # '<|endoftext|>' written in a document is text, not the end-of-text id.
        self._tok.encode_special_tokens = True
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id: int = tok.token_to_id(EOT)

    @classmethod
    def from_files(cls, directory: str) -> "GPT2BPETokenizer":
        """Read `directory`/tokenizer.json, or else vocab.json + merges.txt."""
        import tokenizers  # on use: only runs imported from GPT-2 need it

        path = epath.Path(directory, "tokenizer.json")
        vocab, merges = epath.Path(directory, "vocab.json"), epath.Path(directory, "merges.txt")
        if path.is_file():
            tok = tokenizers.Tokenizer.from_str(path.read_text())
            model_type = json.loads(tok.to_str())["model"]["type"]
            if model_type != "BPE":
                raise UserError(f"{path} holds a {model_type} model; a GPT-2 tokenizer must be byte-level BPE")
        elif vocab.is_file() and merges.is_file():
            with _local_copy(directory, [vocab.name, merges.name]) as local:
                bpe = tokenizers.models.BPE.from_file(os.path.join(local, vocab.name), os.path.join(local, merges.name))
            tok = tokenizers.Tokenizer(bpe)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
            tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
        else:
            raise UserError(f"no GPT-2 tokenizer in {directory}: expected tokenizer.json or vocab.json + merges.txt")
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> None:
        """Write tokenizer.json, vocab.json, merges.txt and the transformers configs, then meta."""
        with _local_dir(directory) as local:
            self._tok.save(os.path.join(local, "tokenizer.json"))
            self._tok.model.save(local)
            special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
            with open(os.path.join(local, "special_tokens_map.json"), "w") as f:
                json.dump(special, f, indent=2)
            config = {
                **special,
                "tokenizer_class": "GPT2Tokenizer",
                "add_prefix_space": False,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "errors": "replace",
            }
            with open(os.path.join(local, "tokenizer_config.json"), "w") as f:
                json.dump(config, f, indent=2)
            _write_meta(local, {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                                "fingerprint": self.fingerprint()})

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]


def load_tokenizer(directory: str) -> Tokenizer:
    """Load what `save` wrote; a Hugging Face GPT-2 tokenizer directory also loads."""
    meta_path = epath.Path(directory, META_FILE)
    if not meta_path.is_file():
        if any(epath.Path(directory, f).is_file() for f in ("tokenizer.json", "vocab.json")):
            return GPT2BPETokenizer.from_files(directory)
        raise UserError(f"{directory} is not a tokenizer directory: expected {META_FILE} (written by gptjax) "
                        "or tokenizer.json / vocab.json + merges.txt (Hugging Face GPT-2)")
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{meta_path} is not a valid tokenizer meta file (expected JSON with 'kind')") from None
    if kind == SentencePieceTokenizer.kind:
        path = epath.Path(directory, meta.get("model_file", SPM_FILE))
        if not path.is_file():
            raise UserError(f"{directory}: {META_FILE} names a SentencePiece model but {path} is missing")
        tok: Tokenizer = SentencePieceTokenizer(path.read_bytes())
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
    parent = None if _is_url(directory) else os.path.dirname(directory)
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
            _upload(tmp, directory)
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
