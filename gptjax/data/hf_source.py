"""`hf:NAME[/CONFIG]`: a Hugging Face dataset, from the Hub or a directory `save_to_disk` wrote.

    hf:DIRECTORY              a dataset saved with save_to_disk (a Dataset or a DatasetDict)
    hf:ORG/NAME[/CONFIG]      a Hub dataset (downloaded into the Hugging Face cache by
                              `datasets`, or read as a stream with data.hf_streaming)

Settings: data.hf_split (the split to read), data.hf_val_split ('' holds out val_fraction of
it by the hash of each row's key 'split:row'; else that split is validation), data.text_field
(the column), data.hf_max_docs / data.hf_max_chars (a budget: the first rows, or the rows up
to that many characters; 0 means all). A downloaded dataset is cut into ranges of rows that
worker processes read (each reopens it from disk); a stream, or a character budget, is read
in order by one process. `datasets` is an optional extra, imported only for these sources.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from gptjax.data import units as units_lib
from gptjax.data.units import Advance, Doc, Reader, Unit, pieces
from gptjax.errors import UserError

_READ_ROWS = 1024


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the `datasets` package: pip install 'gptjax[hf]' (or pip install datasets)"
                        ) from None
    datasets.disable_progress_bars()
    return datasets


def parse(arg: str) -> tuple[str, str | None, bool]:
    """(path or Hub name, config or None, whether it is a local directory) of hf:ARG."""
    local = os.path.expanduser(arg)
    if os.path.isdir(local):
        return os.path.abspath(local), None, True
    parts = arg.strip("/").split("/")
    if len(parts) > 3 or not all(parts):
        raise UserError(f"data.source 'hf:{arg}': expected hf:DIRECTORY (a dataset saved with save_to_disk), "
                        "hf:ORG/NAME or hf:ORG/NAME/CONFIG")
    name = "/".join(parts[:2])
    return name, ("/".join(parts[2:]) or None), False


def open_split(hf: tuple, split: str, offline: bool = False) -> Any:
    """The split `split` of the dataset `hf` = (path or name, config, local, streaming)."""
    path, config, local, streaming = hf
    if offline and not local:  # a worker reopening what the parent downloaded: the cache has it
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = _datasets()
    what = f"hf:{path}" + (f"/{config}" if config else "")
    if local:
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise UserError(f"{what}: not a dataset saved with save_to_disk ({' '.join(str(e).split())})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{what} has no split {split!r}; splits: {sorted(ds)} (set data.hf_split)")
            return ds[split]
        if split != "train":
            raise UserError(f"{what} is a single dataset without splits; leave data.hf_split and "
                            "data.hf_val_split at 'train' and ''")
        return ds
    try:
        return datasets.load_dataset(path, config, split=split, streaming=streaming)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"{what} has no split {split!r} ({' '.join(str(e).split())}); set data.hf_split") from None
        raise UserError(f"{what}: {' '.join(str(e).split())}") from None
    except (FileNotFoundError, ConnectionError) as e:
        raise UserError(f"{what}: no such dataset here or on the Hub, or it cannot be reached "
                        f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def _check_column(ds: Any, column: str, what: str) -> None:
    names = list(ds.column_names or []) if ds.column_names is not None else list(ds.features or {})
    if names and column not in names:
        raise UserError(f"{what} has no column {column!r} (columns: {names}); set data.text_field to the text column")


def resolve(spec: Any, cfg: Any, download: bool) -> tuple[dict, Reader, list[Unit] | None, Any, int | None]:
    """(identity, reader, units or None, sequential reader or None, size in rows) of an hf: source."""
    path, config, local = parse(spec.arg)
    streaming = bool(cfg.hf_streaming) and not local
    hf = (path, config, local, streaming)
    reader = Reader("hf", text_field=cfg.text_field, hf=hf, val_split=cfg.hf_val_split)
    identity = {"kind": "hf", "dataset": path, "config": config, "split": cfg.hf_split, "val_split": cfg.hf_val_split,
                "column": cfg.text_field, "max_docs": int(cfg.hf_max_docs), "max_chars": int(cfg.hf_max_chars)}
    splits = [cfg.hf_split] + ([cfg.hf_val_split] if cfg.hf_val_split else [])
    if not download and not local:  # another host reads it; the cache key needs only these names
        return identity, reader, None, None, None
    opened = {split: open_split(hf, split) for split in splits}
    for split, ds in opened.items():
        _check_column(ds, cfg.text_field, f"hf:{spec.arg} split {split!r}")
    if local:
        identity["fingerprint"] = [getattr(ds, "_fingerprint", "") for ds in opened.values()]
    if streaming or cfg.hf_max_chars:
        read = lambda advance: _sequential(opened, reader, int(cfg.hf_max_docs), int(cfg.hf_max_chars), advance)
        return identity, reader, None, read, None
    units = []
    for split, ds in opened.items():
        rows = len(ds) if not cfg.hf_max_docs else min(len(ds), int(cfg.hf_max_docs))
        per_unit = max(1, int(units_lib.UNIT_BYTES * max(1, len(ds)) / max(1, ds.data.nbytes)))
        units += [Unit("hf", (split,), (split,), a, min(rows, a + per_unit), a, min(rows, a + per_unit) - a,
                       file=len(units)) for a in range(0, rows, per_unit)]
    return identity, reader, units, None, sum(u.size for u in units)


def _forced(reader: Reader, split: str) -> str | None:
    if not reader.val_split:
        return None
    return "val" if split == reader.val_split else "train"


def _row_doc(text: Any, split: str, row: int, reader: Reader) -> Doc | None:
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise UserError(f"hf:{reader.hf[0]} column {reader.text_field!r} holds {type(text).__name__}, not text; "
                        "set data.text_field to the text column")
    return Doc(f"{split}:{row}", pieces(text), _forced(reader, split))


def unit_docs(unit: Unit, reader: Reader, advance: Advance) -> Iterator[Doc]:
    """The documents of rows [start, stop) of a downloaded or saved split (reopened here)."""
    split = unit.paths[0]
    ds = open_split(reader.hf, split, offline=True)
    for a in range(unit.start, unit.stop, _READ_ROWS):
        b = min(unit.stop, a + _READ_ROWS)
        for row, text in enumerate(ds[a:b][reader.text_field], a):
            doc = _row_doc(text, split, row, reader)
            if doc is not None:
                yield doc
        advance(b - a)


def _sequential(opened: dict, reader: Reader, max_docs: int, max_chars: int, advance: Advance) -> Iterator[Doc]:
    """Rows of each split in order, to the budget (rows, then characters) of each."""
    for split, ds in opened.items():
        chars = 0
        for row, example in enumerate(ds):
            if max_docs and row >= max_docs:
                break
            advance(1)
            text = example.get(reader.text_field)
            doc = _row_doc(text, split, row, reader)
            if doc is not None:
                yield doc
                chars += len(text)
                if max_chars and chars >= max_chars:
                    break
