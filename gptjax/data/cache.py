"""The token cache: each source's documents encoded once into binary token files on disk.

Documents are read one at a time, encoded in groups and appended to binary token files (as in
nanoGPT's train.bin / val.bin), each document followed by the end-of-text id, so a corpus need
not fit in memory. The files of one source live in `<cache root>/<kind>-<fingerprint>/` with a
meta.json that records what they were built from; they are built in a temporary directory and
renamed into place, so a half-written cache is never trusted, and they are reused while the
source files, settings and tokenizer stay the same.

A cache root may be a URL (gs://...), shared by a pod's hosts. The files are still built on
local disk, then uploaded with meta.json last (an object store has no rename). Every host
copies the finished files once into a host-local directory (`storage.host_cache_root()`) and
memory-maps them there: a batch reads random windows of the streams, which a local map serves
at memory speed and a bucket would serve one request per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from etils import epath

from gptjax import storage
from gptjax.data.hosts import Hosts, wait_for
from gptjax.data import parallel
from gptjax.data.parallel import parts_dir, share_of_others, source_units, token_dtype, worker_count, write_streams
from gptjax.data.parts import SPLITS
from gptjax.data.progress import Progress, short_path
from gptjax.data.sources import Source
from gptjax.tokenizer import Tokenizer

__all__ = ["SPLITS", "TokenStream", "token_dtype", "token_streams", "write_streams"]
_FORMAT = 1  # bump when the on-disk layout or the tokenization of documents changes


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """One split of one source: memory-mapped token ids, and a loss mask where the source has one."""

    tokens: np.ndarray
    mask: np.ndarray | None = None


def _stream_files(directory: str, meta: dict) -> dict[str, tuple[str, str | None]]:
    return {s: (storage.join(directory, f"{s}.bin"),
                storage.join(directory, f"{s}_mask.bin") if meta["has_mask"] else None) for s in SPLITS}


def _read_valid_meta(directory: str, key: dict) -> dict | None:
    """The cache's meta if it was built from `key` and its files have the recorded sizes, else None."""
    try:
        meta = json.loads(storage.read_text(storage.join(directory, "meta.json")))
        if meta["key"] != key:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, (tokens, mask) in _stream_files(directory, meta).items():
            n = meta[split]["tokens"]
            if n < 1 or storage.size(tokens) != n * itemsize or (mask and storage.size(mask) != n):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _cache_files(directory: str, meta: dict) -> list[str]:
    """Names of a cache's files, meta.json last (written last: it marks the cache complete)."""
    streams = [os.path.basename(p) for pair in _stream_files(directory, meta).values() for p in pair if p]
    return streams + ["meta.json"]


def _place(tmp: str, directory: str, key: dict, meta: dict) -> dict:
    """Rename a finished local cache `tmp` (of `meta`) to `directory`, unless another process got
    there first; the meta of the cache in place."""
    try:
        os.rename(tmp, directory)
    except OSError:  # another process on this host finished the same cache first
        meta = _read_valid_meta(directory, key)
        if meta is None:
            raise
    return meta


def _local_dir(directory: str, key: dict) -> str:
    """Where the host-local copy of the cache at URL `directory` lives; a stale copy is removed."""
    local = os.path.join(storage.host_cache_root(), os.path.basename(directory.rstrip("/")))
    if os.path.exists(local) and _read_valid_meta(local, key) is None:
        shutil.rmtree(local)
    return local


def _host_copy(directory: str, key: dict, meta: dict, progress: Progress) -> str:
    """A host-local copy of the finished cache at URL `directory` (made now unless present)."""
    local = _local_dir(directory, key)
    if os.path.exists(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.tmp-", dir=os.path.dirname(local))
    names = _cache_files(directory, meta)
    try:
        sizes = [storage.size(storage.join(directory, n)) for n in names]
        with progress.bar(f"copying {directory}", sum(sizes), "B") as bar:
            for name, n in zip(names, sizes):
                storage.copy_file(storage.join(directory, name), os.path.join(tmp, name))
                bar.update(n)
        _place(tmp, local, key, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.say(f"{meta['source']}: token cache copied to {local}")
    return local


def _summary(meta: dict) -> str:
    """'12 documents, 3,456 characters -> 1,000 train / 20 val tokens' (what meta.json recorded)."""
    read = [f"{meta[k]:,} {k}" for k in ("documents", "characters") if k in meta]  # caches before these were kept
    tokens = f"{meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens"
    return ", ".join(read) + " -> " + tokens if read else tokens


def _parts(source: Source, directory: str, hosts: Hosts) -> str:
    """The parts directory of a cache being built: shared by a pod's hosts when they share the
    work, else on this host's disk (beside the local copy of a bucket's cache)."""
    shared = parallel.shared(source, hosts)
    local = directory if shared or not storage.is_url(directory) else \
        os.path.join(storage.host_cache_root(), os.path.basename(directory.rstrip("/")))
    return parts_dir(local, source_units(source))


def _build(source: Source, tokenizer: Tokenizer, directory: str, key: dict, progress: Progress, hosts: Hosts,
           workers: int) -> dict:
    """Write the cache of `source` into `directory` by way of a temporary directory; return its meta.

    For a URL `directory` the files are built in the host-local cache, uploaded, and kept there."""
    local = _local_dir(directory, key) if storage.is_url(directory) else directory
    cache_root = os.path.dirname(local)
    os.makedirs(cache_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.tmp-", dir=cache_root)
    start = time.perf_counter()
    parts = _parts(source, directory, hosts)
    try:
        with progress.bar(f"tokenizing {source.name}", source.size, source.unit) as bar:
            counts = write_streams(source, tokenizer, tmp, bar, parts, hosts, workers)
        meta = {"key": key, "source": source.name, "dtype": token_dtype(tokenizer.vocab_size).name,
                "has_mask": source.has_mask, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                **counts}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if local != directory:
            for name in _cache_files(tmp, meta):
                storage.copy_file(os.path.join(tmp, name), storage.join(directory, name))
        meta = _place(tmp, local, key, meta)
        _remove_tree(parts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.say(f"{source.name}: {_summary(meta)} in {time.perf_counter() - start:.1f} s, "
                 f"cached in {short_path(directory)}")
    return meta


def _remove_tree(directory: str) -> None:
    if storage.is_url(directory):
        epath.Path(directory).rmtree(missing_ok=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def token_streams(source: Source, tokenizer: Tokenizer, cache_root: str, progress: Progress,
                  hosts: Hosts, workers: int = 0) -> list[TokenStream]:
    """[train, val] streams of a source, from its cache when that is complete and current, else
    built on `workers` processes (data.workers; 0: every core): on a pod each host encodes its
    share of the source's units, host 0 merges them and the other hosts wait for the cache."""
    workers = worker_count(workers)
    key = json.loads(json.dumps({"format": _FORMAT, "source": source.identity, "tokenizer": tokenizer.fingerprint(),
                                 "val_fraction": float(source.val_fraction)}, sort_keys=True))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = storage.join(cache_root, f"{source.spec.kind}-{digest}")
    meta = _read_valid_meta(directory, key)
    if meta is not None:
        progress.say(f"{source.name}: {_summary(meta)} (token cache reused: {short_path(directory)})")
    elif not hosts.builds:
        with progress.bar(f"tokenizing a share of {source.name}", None, source.unit) as bar:
            share_of_others(source, tokenizer, _parts(source, directory, hosts), hosts, workers, bar)
        wait_for(lambda: _read_valid_meta(directory, key) is not None, directory,
                 f"the token cache of {source.name}", hosts)
        meta = _read_valid_meta(directory, key)
    else:
        if storage.exists(directory):
            progress.say(f"{source.name}: token cache {short_path(directory)} is incomplete or stale; rebuilding it")
            _remove_tree(directory)
        meta = _build(source, tokenizer, directory, key, progress, hosts, workers)
    if storage.is_url(directory):
        directory = _host_copy(directory, key, meta, progress)
    dtype = np.dtype(meta["dtype"])
    # Plain ndarray views of the maps: indexing a np.memmap subclass is several times slower.
    return [TokenStream(np.asarray(np.memmap(tokens, dtype=dtype, mode="r")),
                        np.asarray(np.memmap(mask, dtype=np.uint8, mode="r")) if mask else None)
            for tokens, mask in _stream_files(directory, meta).values()]
