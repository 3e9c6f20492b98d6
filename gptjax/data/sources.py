"""Sources: each term of `data.source` (parsed by `gptjax.source_syntax`), its documents read one at a time.

    stdlib                      the running Python's standard library source (*.py, no tests)
    files:GLOB[,GLOB...]        .jsonl/.ndjson: one document per line (field data.text_field);
                                .parquet: one per row (column data.text_field); any other
                                file is one document of UTF-8 text (formats.py refuses the rest)
    hf:NAME[/CONFIG]            a Hugging Face dataset, or a directory save_to_disk wrote
                                (hf_source.py)
    tfds:NAME                   a TFDS dataset (data.tfds_split / tfds_feature / tfds_data_dir),
                                read through array_record without TensorFlow
    pairs:GLOB[,GLOB...]        .jsonl prompt/completion records: the loss counts only the
                                completion and the end-of-text after it; a batch row holds
                                whole examples (see batches.py: data.packing, long_examples)
    A@3 + B@1                   a mixture: each batch row comes from A with probability 3/4

Each document goes to validation or training by a stable hash of its name (units.py says which
names). A source also says what its token streams depend on (`identity`, the cache key), how
much input it has, so that reading can show progress, and its units: the slices of its input
that worker processes read (see units.py, parallel.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from typing import Callable, Iterator

from gptjax import storage
from gptjax.data import hf_source
from gptjax.data.formats import LINE_DELIMITED
from gptjax.data.reading import source_docs
from gptjax.data.units import Advance, Doc, Reader, Unit, pieces, plan_files
from gptjax.errors import UserError
from gptjax.schema import DataConfig
from gptjax.source_syntax import SourceSpec

__all__ = ["LINE_DELIMITED", "Advance", "Doc", "Source", "SourceSpec", "is_val", "resolve"]

_TFDS_READ_BATCH = 256


def _ignore(n: int) -> None:
    pass


@dataclasses.dataclass
class Source:
    """A checked source: what its streams depend on, and how to read its documents."""

    spec: SourceSpec
    identity: dict  # everything the token streams depend on, besides the tokenizer and split
    read: Callable[[Advance], Iterator[Doc]]
    size: int | None  # input to read, in `unit`s (None: not known before reading)
    unit: str  # "B" (bytes of files) or "doc"
    val_fraction: float  # data.val_fraction: the share of documents held out (by name)
    has_mask: bool = False
    units: list[Unit] | None = None  # the slices worker processes read (None: read in order by one process)
    reader: Reader | None = None  # how `units` are read
    pod_shared: bool = True  # every host of a pod plans the same units (else host 0 encodes them all)

    @property
    def name(self) -> str:
        return self.spec.name

    def documents(self, advance: Advance = _ignore) -> Iterator[Doc]:
        """The documents in a fixed order, each with its split ('train' or 'val': the source's
        choice where it made one, else the hash of its name); `advance` hears how much input
        each step consumed."""
        for doc in self.read(advance):
            if doc.split is None:
                doc.split = "val" if is_val(doc.key, self.val_fraction) else "train"
            yield doc

    def training_texts(self) -> Iterator[str]:
        """Texts of the training documents' segments, in order (read lazily)."""
        for doc in self.documents():
            if doc.split == "train":
                for text, _ in doc.segments:
                    yield text


def _files_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{storage.fingerprint(p)}\n".encode())
    return h.hexdigest()[:16]


def _total_bytes(paths: list[str]) -> int:
    return sum(storage.size(p) for p in paths)


def _tfds_source(spec: SourceSpec, cfg: DataConfig, download: bool) -> Source:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    data_dir = cfg.tfds_data_dir if storage.is_url(cfg.tfds_data_dir) else os.path.expanduser(cfg.tfds_data_dir)
    data_dir = data_dir or None
    try:
        builder = tfds.builder(spec.arg, data_dir=data_dir)
    except DatasetNotFoundError:
        raise UserError(f"data.source 'tfds:{spec.arg}': no such TFDS dataset (names look like 'tiny_shakespeare' "
                        "or 'wiki40b/en:1.3.0'; one prepared elsewhere needs data.tfds_data_dir)") from None
    feature = cfg.tfds_feature
    splits = [(cfg.tfds_split, "train" if cfg.tfds_val_split else None)]
    if cfg.tfds_val_split:
        splits.append((cfg.tfds_val_split, "val"))

    def documents(advance: Advance) -> Iterator[Doc]:
        for split, forced in splits:
            ds = builder.as_data_source(split=split)
            for start in range(0, len(ds), _TFDS_READ_BATCH):
                rows = range(start, min(len(ds), start + _TFDS_READ_BATCH))
                for i, example in zip(rows, ds.__getitems__(list(rows))):
                    advance(1)
                    text = example[feature]
                    if isinstance(text, bytes):
                        text = text.decode("utf-8", errors="replace")
                    elif not isinstance(text, str):
                        raise UserError(f"tfds:{spec.arg} feature {feature!r} is not text ({type(text).__name__}); "
                                        "set data.tfds_feature")
                    if text:
                        yield Doc(f"{split}:{i}", pieces(text), forced)

    identity = {"kind": "tfds", "dataset": builder.info.full_name, "data_dir": str(builder.data_dir),
                "split": cfg.tfds_split, "val_split": cfg.tfds_val_split, "feature": feature}
    if not builder.is_prepared():
        if not download:  # another host reads the documents; the cache key needs only these names
            return Source(spec, identity, documents, None, "doc", cfg.val_fraction)
        if storage.is_url(str(data_dir)):
            raise UserError(f"tfds:{spec.arg} is not prepared in {data_dir}: TFDS cannot write array_record files "
                            "to a bucket; prepare it on local disk (builder.download_and_prepare(file_format="
                            f"'array_record') with that data_dir) and copy its {spec.arg.split(':')[0]}/ folder there")
        builder.download_and_prepare(file_format="array_record")
    if feature not in builder.info.features:
        raise UserError(f"tfds:{spec.arg} has no feature {feature!r}; "
                        f"set data.tfds_feature to one of {sorted(builder.info.features)}")
    for split, _ in splits:
        if split.split("[")[0] not in builder.info.splits:
            raise UserError(f"tfds:{spec.arg} has no split {split!r}; splits: {sorted(builder.info.splits)}")
    size = sum(builder.info.splits[split].num_examples for split, _ in splits)
    return Source(spec, identity, documents, size, "doc", cfg.val_fraction)


def resolve(spec: SourceSpec, cfg: DataConfig, download: bool = True) -> Source:
    """Check a source (paths exist, dataset found) and say how to read its documents.

    Without `download` a TFDS dataset that is not prepared here is not downloaded either: a
    pod's other hosts need only its cache key, since host 0 reads the documents."""
    if spec.kind == "tfds":
        return _tfds_source(spec, cfg, download)
    if spec.kind == "hf":
        identity, reader, units, read, size = hf_source.resolve(spec, cfg, download)
        if units is not None:
            read = lambda advance: source_docs(units, reader, advance)
        return Source(spec, identity, read, size, "doc", cfg.val_fraction, units=units, reader=reader,
                      pod_shared=reader.hf[2])  # a local directory; a Hub dataset is downloaded by host 0 only
    paths, units = plan_files(spec.kind, spec.arg, cfg.text_field)
    if spec.kind == "stdlib":
        identity = {"kind": "stdlib", "python": sys.version, "files": _files_digest(paths)}
        reader = Reader("files")
    else:
        reader = Reader(spec.kind, cfg.text_field, cfg.prompt_field, cfg.completion_field)
        identity = {"kind": spec.kind, "files": _files_digest(paths)}
        if spec.kind == "files":
            identity["text_field"] = cfg.text_field
            if any(u.format != "text" for u in units):  # records are named by file stem (units.py): a new key
                identity["records"] = "stem:number"
        else:
            identity["fields"] = [cfg.prompt_field, cfg.completion_field]
    read = lambda advance: source_docs(units, reader, advance)
    return Source(spec, identity, read, _total_bytes(paths), "B", cfg.val_fraction, has_mask=spec.kind == "pairs",
                  units=units, reader=reader)


def is_val(key: str, val_fraction: float) -> bool:
    """Stable pseudo-random choice of validation documents, from the document's name only."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64

