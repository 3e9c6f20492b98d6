"""Data: document sources -> token streams cached on disk -> deterministic batches.

`config.data.source` names one source or a weighted mixture of them:

    stdlib                      the running Python's standard library source (*.py, no tests)
    files:GLOB[,GLOB...]        .jsonl/.ndjson: one document per line (field data.text_field);
                                any other file is one document
    tfds:NAME                   a TFDS dataset (data.tfds_split / tfds_feature / tfds_data_dir),
                                read through array_record without TensorFlow
    pairs:GLOB[,GLOB...]        .jsonl prompt/completion records: the loss counts only the
                                completion and the end-of-text after it
    A@3 + B@1                   a mixture: each batch row comes from A with probability 3/4

Documents are read one at a time, encoded in groups and appended to binary token files (as in
nanoGPT's train.bin / val.bin), each document followed by the end-of-text id, so a corpus need
not fit in memory. Each document goes to validation or training by a stable hash of its name.
The files live in `<workdir>/data/<kind>-<fingerprint>/` (or `data.cache_dir`) with a meta.json
that records what they were built from; they are built in a temporary directory and renamed
into place, so a half-written cache is never trusted, and they are reused while the source
files, settings and tokenizer stay the same.

Batch rows are random windows of the training stream whose positions depend only on
(seed, step): a resumed run draws the same batches, and each host draws only its own rows.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

SOURCE_KINDS = ("stdlib", "files", "tfds", "pairs")
_SOURCE_HELP = ("allowed: 'stdlib', 'files:GLOB[,GLOB]', 'tfds:NAME', 'pairs:GLOB[,GLOB]', "
                "or a mixture like 'files:a/*.txt@3 + stdlib@1'")
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
LINE_DELIMITED = (".jsonl", ".ndjson")
SPLITS = ("train", "val")
_FORMAT = 1  # bump when the on-disk layout or the tokenization of documents changes
# Long texts are read and encoded in pieces of about this many characters, cut after a newline:
# SentencePiece encodes short strings faster, and the pieces spread over encode_batch's threads.
_TEXT_CHUNK_CHARS = 1 << 16
_ENCODE_BATCH_CHARS = 4 << 20  # text handed to encode_batch at once
_TFDS_READ_BATCH = 256


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`: where the documents come from and how they are held out."""

    source: str = "stdlib"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tfds_split: str = "train"
    tfds_val_split: str = ""  # '' holds out val_fraction of tfds_split; else this split is validation
    tfds_feature: str = "text"
    tfds_data_dir: str = ""
    val_fraction: float = 0.02
    cache_dir: str = ""  # '' means <workdir>/data; must be a local path (the streams are memory-mapped)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> "DataConfig":
        """The fields this module reads; any that `data_cfg` lacks keep their defaults."""
        return cls(**{f.name: data_cfg[f.name] for f in dataclasses.fields(cls) if f.name in data_cfg})


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One term of `data.source`: kind, argument and mixture weight."""

    kind: str
    arg: str
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_source(source: str) -> list[SourceSpec]:
    """Parse 'KIND[:ARG][@WEIGHT] + ...' into specs; weights must be >= 0 and not all zero."""
    parts = [p.strip() for p in str(source).split("+")]
    if not all(parts):
        raise UserError(f"data.source {source!r} has an empty term; {_SOURCE_HELP}")
    specs = []
    for part in parts:
        body, weight = part, 1.0
        if "@" in part:
            body, raw = part.rsplit("@", 1)
            try:
                weight = float(raw)
            except ValueError:
                raise UserError(f"data.source: weight {raw!r} in {part!r} is not a number; "
                                "write SOURCE@WEIGHT, e.g. 'stdlib@2'") from None
            if not math.isfinite(weight) or weight < 0:
                raise UserError(f"data.source: weight {raw!r} in {part!r} must be a finite number >= 0")
        kind, _, arg = body.strip().partition(":")
        kind, arg = kind.strip(), arg.strip()
        if kind not in SOURCE_KINDS:
            raise UserError(f"data.source: unknown source kind {kind!r} in {part!r}; {_SOURCE_HELP}")
        if kind == "stdlib" and arg:
            raise UserError(f"data.source: 'stdlib' takes no argument, got {part!r}")
        if kind != "stdlib" and not arg:
            example = "NAME" if kind == "tfds" else "data/*.jsonl"
            raise UserError(f"data.source: {kind!r} needs an argument, e.g. '{kind}:{example}'")
        specs.append(SourceSpec(kind, arg, weight))
    if sum(s.weight for s in specs) <= 0:
        raise UserError(f"data.source {source!r}: all mixture weights are zero; give at least one a weight > 0")
    return specs


# ---------------------------------------------------------------------------------------------
# Sources: each yields documents one at a time.


@dataclasses.dataclass
class _Doc:
    key: str  # stable name: its hash decides train or validation
    segments: Iterable[tuple[str, bool]]  # (text, counts in the loss), read lazily
    split: str | None = None  # set when the source itself decides (a TFDS validation split)


@dataclasses.dataclass
class _Source:
    spec: SourceSpec
    identity: dict  # everything the token streams depend on, besides the tokenizer and split
    documents: Callable[[], Iterator[_Doc]]
    has_mask: bool = False


def stdlib_files() -> list[str]:
    """Sorted paths of the running interpreter's standard library *.py files, tests excluded."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(paths)


def _files_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _expand_globs(kind: str, arg: str) -> list[str]:
    paths: set[str] = set()
    for pattern in (p.strip() for p in arg.split(",")):
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        found = [os.path.normpath(p) for p in matches if os.path.isfile(p)]
        if not found:
            raise UserError(f"data.source '{kind}:{pattern}' matches no files (relative to {os.getcwd()}); "
                            "give a path or glob of existing files, e.g. 'data/**/*.jsonl'")
        paths.update(found)
    return sorted(paths)


def _text_chunks(path: str) -> Iterator[tuple[str, bool]]:
    """A text file in pieces of about _TEXT_CHUNK_CHARS characters, cut after a newline."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while chunk := f.read(_TEXT_CHUNK_CHARS):
            if not chunk.endswith("\n"):
                chunk += f.readline(_TEXT_CHUNK_CHARS)
            yield chunk, True


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """A long text in trained-on pieces of about _TEXT_CHUNK_CHARS characters, cut after a newline."""
    start = 0
    while start < len(text):
        end = start + _TEXT_CHUNK_CHARS
        newline = text.find("\n", end, end + _TEXT_CHUNK_CHARS)
        end = newline + 1 if newline >= 0 else end
        yield text[start:end], True
        start = end


def _text_file_docs(paths: list[str], key: Callable[[str], str]) -> Iterator[_Doc]:
    for path in paths:
        if os.path.getsize(path):
            yield _Doc(key(path), _text_chunks(path))


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                "a .jsonl file holds one JSON object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
            yield lineno, record


def _string_field(record: dict, name: str, setting: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise UserError(f"{where}: record has no string field {name!r} (fields: {sorted(record)}); "
                        f"set {setting} to the field that holds it")
    return value


def _split_key(path: str) -> str:
    """A file's name without its directory: moving the data does not change the split."""
    return os.path.basename(path)


def _files_docs(paths: list[str], text_field: str) -> Iterator[_Doc]:
    for path in paths:
        if not path.endswith(LINE_DELIMITED):
            yield from _text_file_docs([path], key=_split_key)
            continue
        for lineno, record in _jsonl_records(path):
            text = _string_field(record, text_field, "data.text_field", f"{path}:{lineno}")
            if text:
                yield _Doc(f"{_split_key(path)}:{lineno}", _pieces(text))


def _pairs_docs(paths: list[str], prompt_field: str, completion_field: str) -> Iterator[_Doc]:
    for path in paths:
        for lineno, record in _jsonl_records(path):
            where = f"{path}:{lineno}"
            for name, setting in ((prompt_field, "data.prompt_field"), (completion_field, "data.completion_field")):
                if not isinstance(record.get(name), str):
                    raise UserError(f"{where}: pairs record lacks a string {name!r} (fields: {sorted(record)}); "
                                    f"each line needs a prompt and a completion, named by {setting}")
            yield _Doc(f"{_split_key(path)}:{lineno}", [(record[prompt_field], False), (record[completion_field], True)])


def _tfds_source(spec: SourceSpec, cfg: DataConfig) -> _Source:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    data_dir = os.path.expanduser(cfg.tfds_data_dir) or None
    try:
        builder = tfds.builder(spec.arg, data_dir=data_dir)
    except DatasetNotFoundError:
        raise UserError(f"data.source 'tfds:{spec.arg}': no such TFDS dataset (names look like 'tiny_shakespeare' "
                        "or 'wiki40b/en:1.3.0'; one prepared elsewhere needs data.tfds_data_dir)") from None
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")
    feature = cfg.tfds_feature
    if feature not in builder.info.features:
        raise UserError(f"tfds:{spec.arg} has no feature {feature!r}; "
                        f"set data.tfds_feature to one of {sorted(builder.info.features)}")
    splits = [(cfg.tfds_split, "train" if cfg.tfds_val_split else None)]
    if cfg.tfds_val_split:
        splits.append((cfg.tfds_val_split, "val"))
    for split, _ in splits:
        if split.split("[")[0] not in builder.info.splits:
            raise UserError(f"tfds:{spec.arg} has no split {split!r}; splits: {sorted(builder.info.splits)}")

    def documents() -> Iterator[_Doc]:
        for split, forced in splits:
            ds = builder.as_data_source(split=split)
            for start in range(0, len(ds), _TFDS_READ_BATCH):
                rows = range(start, min(len(ds), start + _TFDS_READ_BATCH))
                for i, example in zip(rows, ds.__getitems__(list(rows))):
                    text = example[feature]
                    if isinstance(text, bytes):
                        text = text.decode("utf-8", errors="replace")
                    elif not isinstance(text, str):
                        raise UserError(f"tfds:{spec.arg} feature {feature!r} is not text ({type(text).__name__}); "
                                        "set data.tfds_feature")
                    if text:
                        yield _Doc(f"{split}:{i}", _pieces(text), forced)

    identity = {"kind": "tfds", "dataset": builder.info.full_name, "data_dir": str(builder.data_dir),
                "split": cfg.tfds_split, "val_split": cfg.tfds_val_split, "feature": feature}
    return _Source(spec, identity, documents)


def _resolve(spec: SourceSpec, cfg: DataConfig) -> _Source:
    """Check a source (paths exist, dataset found) and say how to read its documents."""
    if spec.kind == "stdlib":
        paths = stdlib_files()
        root = sysconfig.get_paths()["stdlib"]
        identity = {"kind": "stdlib", "python": sys.version, "files": _files_digest(paths)}
        return _Source(spec, identity, lambda: _text_file_docs(paths, key=lambda p: os.path.relpath(p, root)))
    if spec.kind == "tfds":
        return _tfds_source(spec, cfg)
    paths = _expand_globs(spec.kind, spec.arg)
    if spec.kind == "files":
        identity = {"kind": "files", "files": _files_digest(paths), "text_field": cfg.text_field}
        return _Source(spec, identity, lambda: _files_docs(paths, cfg.text_field))
    identity = {"kind": "pairs", "files": _files_digest(paths), "fields": [cfg.prompt_field, cfg.completion_field]}
    return _Source(spec, identity, lambda: _pairs_docs(paths, cfg.prompt_field, cfg.completion_field), has_mask=True)


def _is_val(key: str, val_fraction: float) -> bool:
    """Stable pseudo-random choice of validation documents, from the document's name only."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def _split_of(doc: _Doc, val_fraction: float) -> str:
    return doc.split or ("val" if _is_val(doc.key, val_fraction) else "train")


# ---------------------------------------------------------------------------------------------
# Token streams on disk.


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _SplitWriter:
    """Appends one split's tokens (and loss-mask bytes) to files; remembers where the last doc began."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, with_mask: bool):
        self.tokens_path = os.path.join(directory, f"{split}.bin")
        self.mask_path = os.path.join(directory, f"{split}_mask.bin") if with_mask else None
        self.dtype = dtype
        self._tokens = open(self.tokens_path, "wb")
        self._mask = open(self.mask_path, "wb") if self.mask_path else None
        self.count = self.docs = self.last_doc_start = 0

    def start_doc(self) -> None:
        self.docs += 1
        self.last_doc_start = self.count

    def write(self, ids: list[int], trained: bool) -> None:
        self._tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self._mask:
            self._mask.write((b"\x01" if trained else b"\x00") * len(ids))
        self.count += len(ids)

    def close(self) -> None:
        self._tokens.close()
        if self._mask:
            self._mask.close()


def _move_tail(src: _SplitWriter, dst: _SplitWriter, start: int) -> None:
    """Move tokens [start:] of a closed split to the end of another closed split."""
    pairs = [(src.tokens_path, dst.tokens_path, src.dtype)]
    if src.mask_path and dst.mask_path:
        pairs.append((src.mask_path, dst.mask_path, np.dtype(np.uint8)))
    for a, b, dtype in pairs:
        if start == 0 and dst.count == 0:  # everything: swap the files instead of copying
            os.replace(a, b)
            open(a, "wb").close()
            continue
        tail = np.fromfile(a, dtype=dtype, offset=start * dtype.itemsize)
        os.truncate(a, start * dtype.itemsize)
        with open(b, "ab") as f:
            f.write(tail.tobytes())
    moved = src.count - start
    src.count, dst.count = start, dst.count + moved


def _rebalance(writers: dict[str, _SplitWriter], val_fraction: float, name: str) -> None:
    """Make sure both splits hold something: move the last document, or split the only one."""
    train, val = writers["train"], writers["val"]
    if train.docs + val.docs == 0:
        raise UserError(f"data.source {name!r} has no text: every document is empty")
    if train.docs and val.docs:
        return
    if train.docs + val.docs == 1:  # one document: its tail is the validation text
        if val.docs:
            _move_tail(val, train, 0)
        if train.count < 2:
            raise UserError(f"data.source {name!r} is too short to split into training and validation text")
        _move_tail(train, val, train.count - max(1, int(train.count * val_fraction)))
        train.docs = val.docs = 1
        return
    full, empty = (train, val) if train.docs else (val, train)
    _move_tail(full, empty, full.last_doc_start)
    full.docs, empty.docs = full.docs - 1, 1


def _write_streams(source: _Source, tokenizer: Tokenizer, directory: str, val_fraction: float) -> dict:
    """Encode every document of `source` into directory/{train,val}[_mask].bin; return counts."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(directory, s, dtype, source.has_mask) for s in SPLITS}
    pending: list[tuple[str, str | None, bool, bool]] = []  # (split, text or None for EOT, trained, starts doc)
    pending_chars = 0

    def flush() -> None:
        encoded = iter(tokenizer.encode_batch([text for _, text, _, _ in pending if text is not None]))
        for split, text, trained, starts in pending:
            if starts:
                writers[split].start_doc()
            writers[split].write(next(encoded) if text is not None else [tokenizer.eot_id], trained)
        pending.clear()

    try:
        for doc in source.documents():
            split, first = _split_of(doc, val_fraction), True
            for text, trained in doc.segments:
                pending.append((split, text, trained, first))
                first, pending_chars = False, pending_chars + len(text)
                if pending_chars >= _ENCODE_BATCH_CHARS:
                    flush()
                    pending_chars = 0
                    log.info("%s: %d tokens so far", source.spec.name, sum(w.count for w in writers.values()))
            if not first:
                pending.append((split, None, True, False))
        flush()
    finally:
        for w in writers.values():
            w.close()
    _rebalance(writers, val_fraction, source.spec.name)
    return {s: {"tokens": w.count, "docs": w.docs} for s, w in writers.items()}


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """One split of one source: memory-mapped token ids, and a loss mask where the source has one."""

    tokens: np.ndarray
    mask: np.ndarray | None = None


def _stream_files(directory: str, meta: dict) -> dict[str, tuple[str, str | None]]:
    return {s: (os.path.join(directory, f"{s}.bin"),
                os.path.join(directory, f"{s}_mask.bin") if meta["has_mask"] else None) for s in SPLITS}


def _read_valid_meta(directory: str, key: dict) -> dict | None:
    """The cache's meta if it was built from `key` and its files have the recorded sizes, else None."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if meta["key"] != key:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, (tokens, mask) in _stream_files(directory, meta).items():
            n = meta[split]["tokens"]
            if n < 1 or os.path.getsize(tokens) != n * itemsize or (mask and os.path.getsize(mask) != n):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _token_streams(source: _Source, tokenizer: Tokenizer, cache_root: str, val_fraction: float) -> list[TokenStream]:
    """[train, val] streams of a source, from its cache when that is complete and current, else built."""
    key = json.loads(json.dumps({"format": _FORMAT, "source": source.identity, "tokenizer": tokenizer.fingerprint(),
                                 "val_fraction": float(val_fraction)}, sort_keys=True))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = os.path.join(cache_root, f"{source.spec.kind}-{digest}")
    meta = _read_valid_meta(directory, key)
    if meta is None:
        if os.path.exists(directory):
            log.warning("token cache %s is incomplete or stale; rebuilding it", directory)
            shutil.rmtree(directory)
        os.makedirs(cache_root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=cache_root)
        try:
            counts = _write_streams(source, tokenizer, tmp, val_fraction)
            meta = {"key": key, "source": source.spec.name, "dtype": token_dtype(tokenizer.vocab_size).name,
                    "has_mask": source.has_mask, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                    **counts}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            try:
                os.rename(tmp, directory)
            except OSError:  # another process on this host finished the same cache first
                meta = _read_valid_meta(directory, key)
                if meta is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: %d train / %d val tokens written to %s", source.spec.name, meta["train"]["tokens"],
                 meta["val"]["tokens"], directory)
    dtype = np.dtype(meta["dtype"])
    # Plain ndarray views of the maps: indexing a np.memmap subclass is several times slower.
    return [TokenStream(np.asarray(np.memmap(tokens, dtype=dtype, mode="r")),
                        np.asarray(np.memmap(mask, dtype=np.uint8, mode="r")) if mask else None)
            for tokens, mask in _stream_files(directory, meta).values()]


# ---------------------------------------------------------------------------------------------
# Batches.


def _host_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"bad batch request: batch_size={batch_size}, process {process_index} of {process_count}")
    if batch_size % process_count:
        raise UserError(f"batch size {batch_size} must be divisible by the number of hosts ({process_count})")
    per_host = batch_size // process_count
    return process_index * per_host, (process_index + 1) * per_host


def _windows(x: np.ndarray, width: int) -> np.ndarray:
    """A read-only [len(x) - width + 1, width] view of every window of x (copies nothing)."""
    return np.lib.stride_tricks.as_strided(x, (len(x) - width + 1, width), x.strides * 2, writeable=False)


def _gather(stream: TokenStream, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows stream[s : s + width] for each start s (tokens as int32, mask as uint8 or None)."""
    tokens = _windows(stream.tokens, width)[starts].astype(np.int32)
    return tokens, None if stream.mask is None else _windows(stream.mask, width)[starts]


def _batch(tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": np.ascontiguousarray(tokens[:, :-1]), "targets": np.ascontiguousarray(tokens[:, 1:]),
            "weights": mask[:, 1:].astype(np.float32)}


class Dataset:
    """Token streams of weighted sources, and the deterministic batches drawn from them."""

    def __init__(self, tokenizer: Tokenizer, sources: list[str], weights: list[float],
                 train: list[TokenStream], val: list[TokenStream]):
        self.tokenizer = tokenizer
        self.sources = sources
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.train, self.val = train, val
        self._train_sizes = np.array([len(s.tokens) for s in train], np.int64)

    @property
    def train_tokens(self) -> int:
        return int(self._train_sizes.sum())

    @property
    def val_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.val)

    def check(self, seq_len: int) -> None:
        """Raise UserError unless every training stream and the validation text hold a seq_len+1 window."""
        if seq_len < 1:
            raise UserError(f"seq_len must be a positive integer, got {seq_len}")
        for name, n in zip(self.sources, self._train_sizes):
            if n < seq_len + 1:
                raise UserError(f"{name}: the training text has {n} tokens, fewer than one window of seq_len+1="
                                f"{seq_len + 1}; give more text or use a shorter seq_len")
        if max(len(s.tokens) for s in self.val) < seq_len + 1:
            raise UserError(f"the validation text has {self.val_tokens} tokens, fewer than one window of seq_len+1="
                            f"{seq_len + 1}; raise data.val_fraction, give more text or use a shorter seq_len")

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of the training batch for `step`: a function of (seed, step) only.

        Returns inputs and targets (int32 [rows, seq_len], targets = inputs shifted by one) and
        weights (float32, 0 where the target is not trained on, e.g. a prompt token).
        """
        lo, hi = _host_rows(batch_size, process_index, process_count)
        self.check(seq_len)
        if seed < 0 or step < 0:
            raise UserError(f"seed and step must be >= 0, got seed={seed}, step={step}")
        rng = np.random.default_rng([seed, step])
        # Draw for all rows of the global batch, then keep this host's: hosts agree on the batch.
        if len(self.train) > 1:
            src = rng.choice(len(self.train), size=batch_size, p=self.weights)
        else:
            src = np.zeros(batch_size, np.int64)
        starts = rng.integers(0, self._train_sizes[src] - seq_len)
        src, starts = src[lo:hi], starts[lo:hi]
        tokens = np.empty((hi - lo, seq_len + 1), np.int32)
        mask = np.ones((hi - lo, seq_len + 1), np.uint8)
        for i in np.unique(src):
            rows = src == i
            tokens[rows], m = _gather(self.train[i], starts[rows], seq_len + 1)
            if m is not None:
                mask[rows] = m
        return _batch(tokens, mask)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
        """A fixed validation set: consecutive non-overlapping windows from the start of each source's
        validation stream (sources in proportion to their weights), at most `max_batches` batches.

        The last batch is padded with zero-weight rows, so every batch has the full shape.
        """
        lo, hi = _host_rows(batch_size, process_index, process_count)
        self.check(seq_len)
        total = max(0, int(max_batches)) * batch_size
        rows: list[tuple[int, int]] = []  # (source, start)
        for i, (stream, w) in enumerate(zip(self.val, self.weights)):
            n = min((len(stream.tokens) - 1) // seq_len, math.ceil(w * total))
            rows += [(i, k * seq_len) for k in range(n)]
        rows = rows[:total]
        rows += [(-1, 0)] * (-len(rows) % batch_size)  # padding rows: source -1, weight 0
        batches = []
        for b in range(0, len(rows), batch_size):
            chunk = rows[b + lo : b + hi]
            tokens = np.zeros((hi - lo, seq_len + 1), np.int32)
            mask = np.zeros((hi - lo, seq_len + 1), np.uint8)
            src = np.array([s for s, _ in chunk])
            starts = np.array([t for _, t in chunk], np.int64)
            for i in np.unique(src[src >= 0]):
                sel = src == i
                tokens[sel], m = _gather(self.val[i], starts[sel], seq_len + 1)
                mask[sel] = 1 if m is None else m
            batches.append(_batch(tokens, mask))
        return batches


# ---------------------------------------------------------------------------------------------
# Entry point.


def _tokenizer_settings(config: Any) -> tuple[int, str, int]:
    t = config.get("tokenizer", None) or {}
    return int(t.get("vocab_size", 2048)), str(t.get("model_type", "bpe")), int(t.get("max_chars", 10_000_000))


def _training_texts(sources: list[_Source], val_fraction: float, max_chars: int) -> Iterator[str]:
    """Texts of training documents, each source contributing max_chars in proportion to its weight."""
    total_weight = sum(s.spec.weight for s in sources)
    for source in sources:
        budget = max_chars * source.spec.weight / total_weight
        for doc in source.documents():
            if _split_of(doc, val_fraction) != "train":
                continue
            for text, _ in doc.segments:
                yield text
                budget -= len(text)
                if budget <= 0:
                    break
            if budget <= 0:
                break


def _workdir_tokenizer(config: Any, workdir: str, sources: list[_Source], val_fraction: float) -> Tokenizer:
    """`<workdir>/tokenizer/` if it exists, else a SentencePiece model trained on the training documents."""
    vocab_size, model_type, max_chars = _tokenizer_settings(config)
    directory = os.path.join(workdir, "tokenizer")
    if os.path.isdir(directory):
        tok = load_tokenizer(directory)
        if tok.kind == "sentencepiece" and (tok.vocab_size, tok.model_type) != (vocab_size, model_type):
            raise UserError(f"{directory} holds a {tok.model_type} tokenizer of {tok.vocab_size} pieces but the config "
                            f"asks for {model_type} with {vocab_size}; use a new workdir, or delete that directory "
                            "to retrain")
        return tok
    os.makedirs(workdir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=workdir)
    try:
        log.info("training a %s SentencePiece tokenizer of %d pieces", model_type, vocab_size)
        texts = _training_texts(sources, val_fraction, max_chars)
        tok = train_sentencepiece(texts, tmp, vocab_size, model_type, max_chars)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process saved one first: use that (training is deterministic)
            return load_tokenizer(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def prepare(config: Any, workdir: str, *, tokenizer: Tokenizer | None = None) -> Dataset:
    """Tokenizer and token streams for `config.data.source`, built once and cached under workdir.

    Without `tokenizer`, `<workdir>/tokenizer/` is loaded, or a SentencePiece model is trained
    (config.tokenizer.vocab_size / model_type / max_chars) and saved there. A given tokenizer
    (e.g. GPT-2's, from an imported checkpoint) is used as is and saved there when none is.
    """
    cfg = DataConfig.from_config(config.data)
    specs = [s for s in parse_source(cfg.source) if s.weight > 0]
    sources = [_resolve(s, cfg) for s in specs]
    if tokenizer is None:
        tokenizer = _workdir_tokenizer(config, workdir, sources, cfg.val_fraction)
    elif not os.path.isdir(os.path.join(workdir, "tokenizer")):
        tokenizer.save(os.path.join(workdir, "tokenizer"))
    cache_root = os.path.expanduser(cfg.cache_dir) or os.path.join(workdir, "data")
    streams = [_token_streams(s, tokenizer, cache_root, cfg.val_fraction) for s in sources]
    return Dataset(tokenizer, [s.name for s in specs], [s.weight for s in specs],
                   [t for t, _ in streams], [v for _, v in streams])
