"""Encoding a source on every core of every host: its units (units.py) become parts (parts.py).

Worker processes (data.workers; 0 = every core this process may run on) each read, parse and
encode whole units, one thread each; a source of fewer than POOL_MIN_UNITS units, or one read in
order (TFDS, a stream), is encoded in this process instead, whose tokenizer then uses all
cores. On a pod the units are dealt round-robin to the hosts, each of which encodes its share
into the parts directory that all hosts share (beside the cache); host 0 waits for every part
and merges them. Finished parts survive an interruption: a restarted preparation encodes only
the parts that are missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import pickle
import time
import warnings
from typing import Any, Callable

import numpy as np

from gptjax import storage
from gptjax.data import parts as parts_lib
from gptjax.data.hosts import Hosts
from gptjax.data import sources
from gptjax.data.sources import Source
from gptjax.data.units import Unit
from gptjax.errors import UserError

POOL_MIN_UNITS = 4  # sources of fewer units (~UNIT_BYTES of text each) are encoded in this process
FAILED = "failed-host-{}.txt"  # a host that could not encode its share says why, for host 0
_worker: dict[str, Any] = {}


def worker_count(setting: int) -> int:
    """data.workers, 0 meaning the cores this process may run on (taskset and cgroups respected)."""
    if setting > 0:
        return int(setting)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parts_dir(cache_dir: str, units: list[Unit | None]) -> str:
    """Where the parts of a cache being built go: beside it, named for the cut of its input."""
    plan = json.dumps([u and [u.format, u.paths, u.start, u.stop, u.first] for u in units]).encode()
    parent, name = os.path.split(cache_dir.rstrip("/"))
    return storage.join(parent, f".{name}-{hashlib.sha256(plan).hexdigest()[:12]}.parts")


def source_units(source: Source) -> list[Unit | None]:
    return list(source.units) if source.units else [None]


def _pool_worthy(source: Source, workers: int) -> bool:
    return workers > 1 and bool(source.units) and len(source.units) >= max(2, POOL_MIN_UNITS)


def _init_worker(tokenizer: bytes, source: Source) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one thread per worker: the workers are the parallelism
    tok = pickle.loads(tokenizer)
    if hasattr(tok, "_threads"):
        tok._threads = 1
    _worker.update(tokenizer=tok, source=source)


def _encode(index: int, unit: Unit | None, parts: str, advance: Callable[[int], None] = lambda n: None,
            chars: Callable[[int], None] = lambda n: None, tokenizer: Any = None, source: Source | None = None) -> dict:
    tokenizer = tokenizer or _worker["tokenizer"]
    source = source or _worker["source"]
    lines: list[int] = []
    docs = parts_lib.unit_reader(unit, source, source.reader, advance, lines)
    dtype = token_dtype(tokenizer.vocab_size)
    return parts_lib.encode_part(docs, tokenizer, lambda key: sources.is_val(key, source.val_fraction), dtype,
                                 source.has_mask, parts, index, lines, chars)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_share(source: Source, tokenizer: Any, parts: str, hosts: Hosts, workers: int, bar: Any) -> None:
    """Encode this host's units of `source` that have no finished part in `parts` yet."""
    units = source_units(source)
    mine = [i for i in range(len(units)) if i % hosts.count == hosts.index] if shared(source, hosts) \
        else (list(range(len(units))) if hosts.builds else [])
    todo = [i for i in mine if not parts_lib.part_done(parts, i)]
    for i in mine:
        if i not in todo:
            bar.update(_size(units[i]))
    if not todo:
        return
    storage.makedirs(parts)
    if not _pool_worthy(source, workers) or len(todo) < 2:
        for i in todo:
            _encode(i, units[i], parts, bar.update, bar.chars, tokenizer, source)
        return
    initargs = (pickle.dumps(tokenizer), _picklable(source))
    with _Forking() as forking, cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=_context(),
                                                       initializer=_init_worker, initargs=initargs) as pool:
        # Largest units first, so the last ones to finish are the smallest and no worker waits
        # long for another at the end; the parts are merged in unit order whatever the order here.
        largest_first = sorted(todo, key=lambda i: -_size(units[i]))
        futures = {pool.submit(_encode, i, units[i], parts): i for i in largest_first}
        forking.done()
        try:
            for future in cf.as_completed(futures):
                counts = future.result()
                bar.update(_size(units[futures[future]]))
                bar.chars(counts["characters"])
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _context() -> Any:
    """Forked workers where the platform forks: they start at once and need no importable
    `__main__` (a user's script without a main guard works); else spawned ones."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


class _Forking:
    """While the pool forks its workers: `tokenizers` told that a child runs one thread (else it
    warns at each fork), and JAX's warning about forking a multithreaded process silenced (the
    workers never touch JAX). `done()` restores both once the workers exist."""

    def __enter__(self) -> "_Forking":
        self._env = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*fork.*", category=RuntimeWarning)
        self._open = True
        return self

    def done(self) -> None:
        if not getattr(self, "_open", False):
            return
        self._open = False
        self._warnings.__exit__(None, None, None)
        if self._env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self._env

    def __exit__(self, *exc: Any) -> None:
        self.done()



def _size(unit: Unit | None) -> int:
    return unit.size if unit is not None else 0


def _picklable(source: Source) -> Source:
    """The source without its in-order reader (a closure): workers read units only."""
    import dataclasses

    return dataclasses.replace(source, read=None)


def shared(source: Source, hosts: Hosts) -> bool:
    """Whether the hosts of a pod share this source's encoding (it has units for each)."""
    return hosts.count > 1 and source.pod_shared and bool(source.units) and len(source.units) >= hosts.count


def share_of_others(source: Source, tokenizer: Any, parts: str, hosts: Hosts, workers: int, bar: Any) -> None:
    """A host other than 0: encode its share; on failure leave the reason for host 0."""
    if not shared(source, hosts):
        return
    try:
        encode_share(source, tokenizer, parts, hosts, workers, bar)
    except BaseException as e:
        try:
            storage.write_text(storage.join(parts, FAILED.format(hosts.index)), " ".join(str(e).split()) or repr(e))
        except OSError:
            pass
        raise


def _wait_for_parts(parts: str, n: int, hosts: Hosts) -> None:
    """Host 0: return once all `n` parts are finished; a UserError when another host failed, or
    no new part came for data.host_wait_s seconds."""
    done, last = -1, time.monotonic()
    while True:
        storage.refresh(parts)
        finished = sum(parts_lib.part_done(parts, i) for i in range(n))
        if finished == n:
            return
        for h in range(1, hosts.count):
            failed = storage.join(parts, FAILED.format(h))
            if storage.exists(failed):
                raise UserError(f"host {h} failed to encode its share of the data: {storage.read_text(failed)}")
        if finished != done:
            done, last = finished, time.monotonic()
        if time.monotonic() - last > hosts.wait_s:
            raise UserError(f"host 0: waited {hosts.wait_s:g} s for the other hosts' parts in {parts} "
                            f"({finished} of {n} finished); are all hosts running and sharing that location? "
                            "(data.host_wait_s sets the wait)")
        time.sleep(min(1.0, hosts.wait_s / 20))


def write_streams(source: Source, tokenizer: Any, directory: str, bar: Any, parts: str, hosts: Hosts,
                  workers: int) -> dict:
    """Encode `source` (this host's share, on `workers` processes), wait for the other hosts'
    shares, and merge every part into directory/{train,val}[_mask].bin; the counts."""
    units = source_units(source)
    encode_share(source, tokenizer, parts, hosts, workers, bar)
    if shared(source, hosts):
        _wait_for_parts(parts, len(units), hosts)
    return parts_lib.merge_parts(units, parts, directory, token_dtype(tokenizer.vocab_size), source.has_mask,
                                 lambda key: sources.is_val(key, source.val_fraction), source.val_fraction, source.name)
