"""The file formats `files:` reads, told apart before anything is read, and their readers.

    .jsonl / .ndjson   one JSON record per line; its text field (data.text_field) is a document
    .parquet           one row per document, its text column (data.text_field), by row group
    anything else      UTF-8 text: the whole file is one document

A file is refused (one line naming it and the formats read) when its extension says it is
compressed or binary, or when its first bytes do: a compressed file's magic number, a NUL
byte, or bytes that are not UTF-8. That check runs when the source is resolved, before any
tokenizer is trained, so a wrong file never becomes a document of its raw bytes.

The readers here take a slice of a file (a byte range of a .jsonl file cut after a newline, a
range of a .parquet file's row groups) so that the slices of one file can be read by different
processes; reading all slices in order reads the file.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from typing import Any, Callable, Iterator

from gptjax import storage
from gptjax.errors import UserError

LINE_DELIMITED = (".jsonl", ".ndjson")
PARQUET = (".parquet",)
FORMATS_HELP = ("files: reads UTF-8 text (.jsonl/.ndjson: one JSON record per line; .parquet: one row per "
                "document; any other extension: the whole file is one document); hf:NAME reads Hugging Face datasets")
# Extensions of files that are not text; the name says what they are.
_NOT_TEXT = {
    ".gz": "gzip-compressed", ".tgz": "gzip-compressed", ".zst": "zstd-compressed", ".zstd": "zstd-compressed",
    ".bz2": "bzip2-compressed", ".xz": "xz-compressed", ".lz4": "lz4-compressed", ".zip": "a zip archive",
    ".tar": "a tar archive", ".7z": "a 7z archive", ".arrow": "an Arrow file (a saved dataset: use hf:DIRECTORY)",
    ".feather": "an Arrow file", ".avro": "an Avro file", ".orc": "an ORC file", ".npy": "a NumPy array",
    ".npz": "NumPy arrays", ".bin": "binary", ".pdf": "a PDF", ".pkl": "a pickle", ".pickle": "a pickle",
    ".png": "an image", ".jpg": "an image", ".jpeg": "an image", ".gif": "an image", ".webp": "an image",
    ".mp3": "audio", ".wav": "audio", ".mp4": "video", ".so": "binary", ".exe": "binary", ".db": "a database",
    ".sqlite": "a database", ".h5": "an HDF5 file", ".hdf5": "an HDF5 file", ".tfrecord": "a TFRecord file",
    ".array_record": "an array_record file (a TFDS dataset: use tfds:NAME)", ".safetensors": "model weights",
}
_MAGIC = [(b"\x1f\x8b", "gzip-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"BZh", "bzip2-compressed"),
          (b"\xfd7zXZ\x00", "xz-compressed"), (b"PK\x03\x04", "a zip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
          (b"PAR1", "a Parquet file without the .parquet extension"), (b"ARROW1", "an Arrow file"),
          (b"\x04\x22\x4d\x18", "lz4-compressed"), (b"%PDF", "a PDF")]
_SNIFF_BYTES = 8192
_UNIVERSAL_NEWLINE = re.compile(r"\r\n|\r|\n")
_PROGRESS_EVERY_LINES = 64
PARQUET_BATCH_ROWS = 1024


def file_format(path: str) -> str:
    """'jsonl', 'parquet' or 'text'; a UserError naming the file when it is none of them."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _NOT_TEXT:
        _refuse(path, _NOT_TEXT[ext])
    with (storage.open_binary(path)) as f:
        head = f.read(_SNIFF_BYTES)
    if ext in PARQUET:
        if not head.startswith(b"PAR1"):
            _refuse(path, "not a Parquet file (it does not begin with PAR1)")
        return "parquet"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            _refuse(path, what)
    if b"\x00" in head:
        _refuse(path, "binary (it holds NUL bytes)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        _refuse(path, "not UTF-8 text")
    return "jsonl" if ext in LINE_DELIMITED else "text"


def _refuse(path: str, what: str) -> None:
    raise UserError(f"{path} is {what}, which gptjax does not read as text; {FORMATS_HELP}")


def jsonl_cuts(path: str, target_bytes: int) -> list[int]:
    """Byte offsets [0, ..., size] cutting a file into ranges of about `target_bytes`, each cut
    just after a newline (so a range holds whole lines)."""
    size = storage.size(path)
    cuts = [0]
    if size > target_bytes:
        with storage.open_binary(path) as f:
            while cuts[-1] + target_bytes < size:
                f.seek(cuts[-1] + target_bytes)
                f.readline()
                pos = f.tell()
                if pos >= size:
                    break
                cuts.append(pos)
    return cuts + [size]


def jsonl_records(path: str, start: int, stop: int, advance: Callable[[int], None],
                  lines: list[int] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number within the range, from 1; record) of the non-blank lines in bytes
    [start, stop) of a .jsonl file. Lines end at '\\n', '\\r\\n' or '\\r' (Python's universal
    newlines), so numbers match reading the file as text. `advance` hears bytes read; `lines`,
    when given, gets the range's line count (blank lines included) appended at the end."""
    lineno, done = 0, start
    with storage.open_binary(path) as f:
        f.seek(start)
        pos = start
        while pos < stop:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            text = raw.decode("utf-8", errors="replace")
            parts = _UNIVERSAL_NEWLINE.split(text) if "\r" in text else [text]
            if "\r" in text and parts[-1] == "":
                parts.pop()
            for line in parts:
                lineno += 1
                if lineno % _PROGRESS_EVERY_LINES == 0:
                    advance(pos - done)
                    done = pos
                if not line.strip():
                    continue
                yield lineno, _json_record(line, f"{path}:{lineno}" if start == 0 else f"{path} (byte {start} on)")
    advance(pos - done)
    if lines is not None:
        lines.append(lineno)


def _json_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); a .jsonl file holds one JSON object per line") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    return record


def parquet_file(path: str) -> Any:
    """A pyarrow ParquetFile on a local path or a URL; a UserError when pyarrow cannot read it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow (a gptjax dependency): pip install pyarrow") from None
    try:
        return pq.ParquetFile(path if not storage.is_url(path) else storage.open_binary(path))
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())})") from None


def parquet_row_groups(path: str, column: str) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group of a .parquet file; a UserError when it
    lacks the text column."""
    pf = parquet_file(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise UserError(f"{path} has no column {column!r} (columns: {names}); set data.text_field to the column "
                        "that holds the text")
    groups = [pf.metadata.row_group(i) for i in range(pf.metadata.num_row_groups)]
    return [(g.num_rows, g.total_byte_size) for g in groups]


def parquet_texts(path: str, column: str, groups: range) -> Iterator[str | None]:
    """The text column of row groups `groups` of a .parquet file, row by row (None: a null)."""
    pf = parquet_file(path)
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=list(groups), columns=[column]):
        values = batch.column(0)
        yield from values.to_pylist()
