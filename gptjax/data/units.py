"""Units of work: a source's input cut into slices that separate processes can read and encode.

A unit is a group of whole text files, a byte range of a .jsonl file (cut after a newline), a
run of a .parquet file's row groups, or a range of a Hugging Face dataset's rows. The cut
depends only on the input (names and sizes), never on how many processes read it, and reading
the units in order reads the source's documents in the order a single reader would: that is
what makes the token cache byte-identical for any number of workers and hosts.

Each document has a key whose hash sends it to training or validation (`sources.is_val`):
a text file's name; a record's file stem and record number (`docs:12` for line 12 of
docs.jsonl or row 12 of docs.parquet, so the same rows split the same in either format); a
pairs: record's file name and line. A .jsonl range that does not start its file does not know
how many lines came before it: its documents carry their line number within the range
(`Doc.record`), and whoever reads the units in order adds the lines of the earlier ranges.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from typing import Callable, Iterable, Iterator

from gptjax import storage
from gptjax.data import formats
from gptjax.errors import UserError

STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
UNIT_BYTES = 8 << 20  # input per unit: small enough to balance the workers, large enough to amortize a part
Advance = Callable[[int], None]  # told how much more input (bytes or documents) has been read


@dataclasses.dataclass
class Doc:
    """One document: its name, and its text as (text, counts in the loss) segments read lazily."""

    key: str  # stable name: its hash decides train or validation (a prefix while `record` is set)
    segments: Iterable[tuple[str, bool]]
    split: str | None = None  # 'train' or 'val'; a reader sets it only where the source decides (TFDS splits)
    record: int = 0  # > 0: line number within a .jsonl range; the key is f"{key}:{lines before + record}"


@dataclasses.dataclass(frozen=True)
class Reader:
    """How a source's units are read: what a record's text is. Picklable (sent to workers)."""

    mode: str  # 'files' | 'pairs' | 'hf'
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    hf: tuple = ()  # hf: (path or name, config, streaming) as hf_source.open_split takes it
    val_split: str = ""  # hf: the split that is validation ('' : by hash)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A slice of a source's input. Picklable (sent to workers)."""

    format: str  # 'text' | 'jsonl' | 'parquet' | 'hf'
    paths: tuple[str, ...]  # text: the files, one document each; else the one file (hf: the split)
    keys: tuple[str, ...]  # text: each file's key; else the key prefix of its records
    start: int = 0  # jsonl: first byte; parquet: first row group; hf: first row
    stop: int = 0  # the end, exclusive, in the same terms
    first: int = 0  # records of the file before this unit; -1: not known (a .jsonl range past the start)
    size: int = 0  # input bytes (hf: rows), for progress
    file: int = 0  # which file of the source: a file's units are consecutive


def pieces(text: str) -> Iterator[tuple[str, bool]]:
    """A long text in trained-on pieces of about TEXT_CHUNK_CHARS characters, cut after a newline."""
    start = 0
    while start < len(text):
        end = start + TEXT_CHUNK_CHARS
        newline = text.find("\n", end, end + TEXT_CHUNK_CHARS)
        end = newline + 1 if newline >= 0 else end
        yield text[start:end], True
        start = end


# Long texts are read and encoded in pieces of about this many characters, cut after a newline:
# SentencePiece encodes short strings faster, and the pieces spread over encode_batch's threads.
TEXT_CHUNK_CHARS = 1 << 16


class _BytesRead:
    """Reports to `advance` how far reading an open text file has got, in bytes of the file."""

    def __init__(self, f, advance: Advance):
        self._f, self._advance, self._pos = f, advance, 0

    def update(self) -> None:
        pos = self._f.buffer.tell()  # the decoder's position, ahead of the text by one read buffer at most
        self._advance(pos - self._pos)
        self._pos = pos


def text_chunks(path: str, advance: Advance) -> Iterator[tuple[str, bool]]:
    """A text file in pieces of about TEXT_CHUNK_CHARS characters, cut after a newline."""
    with storage.open_text(path, encoding="utf-8", errors="replace", newline="") as f:
        progress = _BytesRead(f, advance)
        while chunk := f.read(TEXT_CHUNK_CHARS):
            if not chunk.endswith("\n"):
                chunk += f.readline(TEXT_CHUNK_CHARS)
            progress.update()
            yield chunk, True
        progress.update()


def string_field(record: dict, name: str, setting: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise UserError(f"{where}: record has no string field {name!r} (fields: {sorted(record)}); "
                        f"set {setting} to the field that holds it")
    return value


def record_key(path: str) -> str:
    """The key prefix of a file's records: its name without directory or extension."""
    return os.path.splitext(os.path.basename(path))[0]


def stdlib_files() -> list[str]:
    """Sorted paths of the running interpreter's standard library *.py files, tests excluded."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    return sorted(paths)


def _expand_globs(kind: str, arg: str) -> list[str]:
    """The files a files:/pairs: argument names (comma-separated paths or globs), sorted; a
    pattern that matches none is a UserError."""
    paths: set[str] = set()
    for pattern in (p.strip() for p in arg.split(",")):
        if storage.is_url(pattern) and "**" in pattern:
            raise UserError(f"data.source '{kind}:{pattern}': '**' is not supported in a URL (each level is "
                            "listed separately); write one '*' per directory level, e.g. 'gs://b/data/*/*.jsonl'")
        found = storage.glob_files(pattern)
        if not found:
            where = "" if storage.is_url(pattern) else f" (relative to {os.getcwd()})"
            raise UserError(f"data.source '{kind}:{pattern}' matches no files{where}; "
                            "give a path or glob of existing files, e.g. 'data/**/*.jsonl'")
        paths.update(found)
    return sorted(paths)


def plan_files(kind: str, arg: str, text_field: str, unit_bytes: int = 0) -> tuple[list[str], list[Unit]]:
    """(files, units) of a `stdlib`, `files:` or `pairs:` source (`arg`: comma-separated paths
    or globs), each file's format checked first (a file gptjax does not read is a UserError
    naming it). The standard library's files are keyed by their path inside it."""
    paths = stdlib_files() if kind == "stdlib" else _expand_globs(kind, arg)
    mode = "pairs" if kind == "pairs" else "files"
    unit_bytes = unit_bytes or UNIT_BYTES
    units: list[Unit] = []
    group: list[tuple[str, str, int]] = []

    def close_group() -> None:
        if group:
            units.append(Unit("text", tuple(p for p, _, _ in group), tuple(k for _, k, _ in group),
                              size=sum(n for _, _, n in group), file=len(units)))
            group.clear()

    for path in paths:
        fmt = formats.file_format(path)
        if mode == "pairs" and fmt != "jsonl":
            raise UserError(f"{path}: pairs: reads .jsonl files of prompt/completion records; "
                            "convert it, or use files: for plain text")
        size = storage.size(path)
        if fmt == "text":
            if size:
                group.append((path, os.path.basename(path), size))
                if sum(n for _, _, n in group) >= unit_bytes:
                    close_group()
            continue
        close_group()
        prefix = record_key(path) if mode == "files" else os.path.basename(path)
        if fmt == "jsonl":
            cuts = formats.jsonl_cuts(path, unit_bytes)
            units += [Unit("jsonl", (path,), (prefix,), a, b, 0 if a == 0 else -1, b - a, len(units))
                      for a, b in zip(cuts, cuts[1:]) if b > a]
            continue
        groups = formats.parquet_row_groups(path, text_field)  # cut by uncompressed bytes: the text to encode
        whole = max(1, sum(b for _, b in groups))
        start = first = rows = text = done = 0
        for g, (n, b) in enumerate(groups):
            rows, text = rows + n, text + b
            if text >= unit_bytes or g == len(groups) - 1:
                share = size * (done + text) // whole - size * done // whole  # of the file's bytes, for progress
                units.append(Unit("parquet", (path,), (prefix,), start, g + 1, first, share, len(units)))
                start, first, done, rows, text = g + 1, first + rows, done + text, 0, 0
    close_group()
    if kind == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        return paths, [Unit("text", u.paths, tuple(os.path.relpath(p, root) for p in u.paths), size=u.size, file=i)
                       for i, u in enumerate(units)]
    first: dict[str, int] = {}  # a file's units share one index: its first unit's position
    return paths, [dataclasses.replace(u, file=first.setdefault(u.paths[0], i)) for i, u in enumerate(units)]


def parquet_docs(unit: Unit, reader: Reader, advance: Advance) -> Iterator[Doc]:
    """The documents of a run of row groups of a .parquet file."""
    path, prefix = unit.paths[0], unit.keys[0]
    row = unit.first
    for text in formats.parquet_texts(path, reader.text_field, range(unit.start, unit.stop)):
        row += 1
        if text is None or text == "":
            continue
        if not isinstance(text, str):
            raise UserError(f"{path}: column {reader.text_field!r} holds {type(text).__name__}, not text; "
                            "set data.text_field to the column that holds the text")
        yield Doc(f"{prefix}:{row}", pieces(text))
    advance(unit.size)
