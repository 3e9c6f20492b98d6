"""Parts: one unit's documents encoded into files, and the parts merged into a token cache.

A part is what one worker makes of one unit (see units.py), in a parts directory:

    NNNNNN.tokens     its documents' token ids, each document followed by the end-of-text id
    NNNNNN.mask       one byte per token, 1 where it counts in the loss (pairs: sources only)
    NNNNNN.docs.npy   int64 [documents, 3]: tokens (end-of-text included), split (1 train,
                      2 validation, 0 not known yet: a .jsonl range's record), record number
    NNNNNN.json       counts (documents, characters, lines, tokens); written last, it marks the
                      part complete, so an interrupted preparation keeps the parts it finished

Merging reads the parts in unit order and appends each document's tokens to the training or
the validation stream: exactly what one reader of the whole source would have written, so the
cache does not depend on how many workers or hosts made the parts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np

from gptjax import storage
from gptjax.data import reading
from gptjax.data.units import Advance, Doc, Unit
from gptjax.errors import UserError

SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 4 << 20  # text handed to encode_batch at once
_CODES = {"train": 1, "val": 2}


def part_name(index: int, suffix: str) -> str:
    return f"{index:06d}.{suffix}"


def part_done(parts: str, index: int) -> bool:
    return storage.exists(storage.join(parts, part_name(index, "json")))


def encode_part(docs: Iterator[Doc], tokenizer, is_val: Callable[[str], bool], dtype: np.dtype, with_mask: bool,
                parts: str, index: int, lines: list[int], chars: Callable[[int], None]) -> dict:
    """Encode `docs` into part `index` of the directory `parts` (local or a URL); its counts.
    `lines` is the list the unit's reader appends its line count to; `chars` hears characters
    encoded."""
    local = parts if not storage.is_url(parts) else tempfile.mkdtemp(prefix="gptjax-part-")
    storage.makedirs(local)
    tokens_path = os.path.join(local, part_name(index, "tokens.tmp"))
    mask_path = os.path.join(local, part_name(index, "mask.tmp")) if with_mask else None
    table: list[tuple[int, int, int]] = []
    pending: list[tuple[str, bool]] = []
    ends: list[tuple[int, int, int]] = []  # per document: segments pending, split code, record
    counts = {"documents": 0, "characters": 0, "tokens": 0}
    with open(tokens_path, "wb") as out, (open(mask_path, "wb") if mask_path else open(os.devnull, "wb")) as mask:
        def flush() -> None:
            encoded = iter(tokenizer.encode_batch([text for text, _ in pending]))
            seg = 0
            for n_segments, code, record in ends:
                n = 0
                for _ in range(n_segments):
                    ids = next(encoded)
                    trained = pending[seg][1]
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    mask.write((b"\x01" if trained else b"\x00") * len(ids))
                    n += len(ids)
                    seg += 1
                out.write(np.asarray([tokenizer.eot_id], dtype=dtype).tobytes())
                mask.write(b"\x01")
                table.append((n + 1, code, record))
                counts["tokens"] += n + 1
            chars(sum(len(t) for t, _ in pending))
            pending.clear()
            ends.clear()

        pending_chars = 0
        for doc in docs:
            n_segments = 0
            for text, trained in doc.segments:
                pending.append((text, trained))
                n_segments += 1
                pending_chars += len(text)
                counts["characters"] += len(text)
            if not n_segments:
                continue
            split = doc.split or (None if doc.record else ("val" if is_val(doc.key) else "train"))
            ends.append((n_segments, _CODES[split] if split else 0, doc.record))
            counts["documents"] += 1
            if pending_chars >= ENCODE_BATCH_CHARS:
                flush()
                pending_chars = 0
        flush()
    counts["lines"] = lines[0] if lines else 0
    names = {"tokens": tokens_path, "mask": mask_path}
    for suffix, path in names.items():
        if path:
            os.replace(path, os.path.join(local, part_name(index, suffix)))
    np.save(os.path.join(local, part_name(index, "docs.npy")), np.asarray(table, np.int64).reshape(-1, 3))
    meta = os.path.join(local, part_name(index, "json.tmp"))
    with open(meta, "w") as f:
        json.dump(counts, f)
    os.replace(meta, os.path.join(local, part_name(index, "json")))
    if local != parts:
        try:
            for suffix in ("tokens", "mask", "docs.npy", "json"):  # the json last: it marks the part complete
                if os.path.exists(os.path.join(local, part_name(index, suffix))):
                    storage.copy_file(os.path.join(local, part_name(index, suffix)),
                                      storage.join(parts, part_name(index, suffix)))
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return counts


class _SplitWriter:
    """Appends one split's tokens (and loss-mask bytes) to files; remembers where the last doc began."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, with_mask: bool):
        self.tokens_path = os.path.join(directory, f"{split}.bin")
        self.mask_path = os.path.join(directory, f"{split}_mask.bin") if with_mask else None
        self.dtype = dtype
        self._tokens = open(self.tokens_path, "wb")
        self._mask = open(self.mask_path, "wb") if self.mask_path else None
        self.count = self.docs = self.last_doc_start = 0

    def write(self, tokens: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray) -> None:
        """Append whole documents (`lengths` tokens each)."""
        if not len(lengths):
            return
        self._tokens.write(tokens.tobytes())
        if self._mask is not None:
            self._mask.write(mask.tobytes())
        self.docs += len(lengths)
        self.last_doc_start = self.count + len(tokens) - int(lengths[-1])
        self.count += len(tokens)

    def close(self) -> None:
        self._tokens.close()
        if self._mask:
            self._mask.close()


def _read(parts: str, name: str, dtype: np.dtype) -> np.ndarray:
    path = storage.join(parts, name)
    return np.fromfile(path, dtype=dtype) if not storage.is_url(path) else np.frombuffer(storage.read_bytes(path), dtype)


def merge_parts(units: list[Unit | None], parts: str, directory: str, dtype: np.dtype, with_mask: bool,
                is_val: Callable[[str], bool], val_fraction: float, name: str) -> dict:
    """Write directory/{train,val}[_mask].bin from the parts of `units`, in order; the counts."""
    writers = {s: _SplitWriter(directory, s, dtype, with_mask) for s in SPLITS}
    offsets: dict[int, int] = {}  # lines of each file's .jsonl ranges read so far
    totals = {"documents": 0, "characters": 0}
    try:
        for i, unit in enumerate(units):
            counts = json.loads(storage.read_text(storage.join(parts, part_name(i, "json"))))
            table = np.load(storage.open_binary(storage.join(parts, part_name(i, "docs.npy"))))
            tokens = _read(parts, part_name(i, "tokens"), dtype)
            mask = _read(parts, part_name(i, "mask"), np.dtype(np.uint8)) if with_mask else None
            codes = table[:, 1].copy()
            if unit is not None:
                base = offsets.get(unit.file, 0)
                for d in np.flatnonzero(codes == 0):
                    codes[d] = _CODES["val"] if is_val(f"{unit.keys[0]}:{base + int(table[d, 2])}") else _CODES["train"]
                offsets[unit.file] = base + counts["lines"]
            lengths = table[:, 0]
            for split, code in _CODES.items():
                docs = codes == code
                sel = np.repeat(docs, lengths)
                writers[split].write(tokens[sel], None if mask is None else mask[sel], lengths[docs])
            totals["documents"] += counts["documents"]
            totals["characters"] += counts["characters"]
    finally:
        for w in writers.values():
            w.close()
    _rebalance(writers, val_fraction, name)
    return {**totals, **{s: {"tokens": w.count, "docs": w.docs} for s, w in writers.items()}}


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


def unit_reader(unit: Unit | None, source, reader, advance: Advance, lines: list[int]) -> Iterator[Doc]:
    """The documents of one unit (None: the whole source, read in order by its own reader)."""
    if unit is None:
        return source.read(advance)
    return reading.unit_docs(unit, reader, advance, lines)
