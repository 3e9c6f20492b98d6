"""Reading units: each unit's documents in order, and a whole source's from its units.

Kept apart from units.py (what a unit is, and the file formats' readers) so that the readers of
every kind of unit, Hugging Face datasets included, meet in one place without an import cycle.
"""

from __future__ import annotations

from typing import Iterator

from gptjax import storage
from gptjax.data import formats, hf_source
from gptjax.data.units import Advance, Doc, Reader, Unit, parquet_docs, pieces, string_field, text_chunks
from gptjax.errors import UserError


def unit_docs(unit: Unit, reader: Reader, advance: Advance, lines: list[int] | None = None) -> Iterator[Doc]:
    """The documents of one unit in order; `lines`, when given, gets the unit's line count
    appended (a .jsonl range's lines, blank ones included) once it is read."""
    if unit.format == "text":
        for path, key in zip(unit.paths, unit.keys):
            if storage.size(path):
                yield Doc(key, text_chunks(path, advance))
        return
    if unit.format == "parquet":
        yield from parquet_docs(unit, reader, advance)
        return
    if unit.format == "hf":
        yield from hf_source.unit_docs(unit, reader, advance)
        return
    path, prefix = unit.paths[0], unit.keys[0]
    for lineno, record in formats.jsonl_records(path, unit.start, unit.stop, advance, lines):
        where = f"{path}:{lineno}" if unit.first == 0 else f"{path} (line {lineno} from byte {unit.start})"
        key, record_no = (f"{prefix}:{lineno}", 0) if unit.first == 0 else (prefix, lineno)
        if reader.mode == "pairs":
            for name, setting in ((reader.prompt_field, "data.prompt_field"),
                                  (reader.completion_field, "data.completion_field")):
                if not isinstance(record.get(name), str):
                    raise UserError(f"{where}: pairs record lacks a string {name!r} (fields: {sorted(record)}); "
                                    f"each line needs a prompt and a completion, named by {setting}")
            yield Doc(key, [(record[reader.prompt_field], False), (record[reader.completion_field], True)],
                      record=record_no)
            continue
        text = string_field(record, reader.text_field, "data.text_field", where)
        if text:
            yield Doc(key, pieces(text), record=record_no)



def source_docs(units: list[Unit], reader: Reader, advance: Advance) -> Iterator[Doc]:
    """Every document of `units` in order, each with its full key (line numbers of .jsonl
    ranges made file-wide by counting the lines of the ranges before)."""
    offsets: dict[int, int] = {}
    for unit in units:
        lines: list[int] = []
        base = offsets.get(unit.file, 0)
        for doc in unit_docs(unit, reader, advance, lines):
            if doc.record:
                doc.key, doc.record = f"{doc.key}:{base + doc.record}", 0
            yield doc
        if lines:
            offsets[unit.file] = base + lines[0]
