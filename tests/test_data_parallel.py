"""Tokenization on every core of every host: the token cache is byte-identical for any number
of worker processes and of hosts, and a preparation interrupted halfway resumes from the parts
it finished and ends with the same cache."""

from __future__ import annotations

import json
import os
import random
import threading

import ml_collections
import numpy as np
import pytest

from gptjax import data
from gptjax import tokenizer as tk
from gptjax.data import parallel, parts, units
from gptjax.layout import RunDir
from test_data import typed_sections

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Text files, a .jsonl file with blank and '\\r\\n' lines, and a .parquet file: many units each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    for i in range(6):
        (root / f"doc{i}.txt").write_text("\n".join(text(12) for _ in range(rng.randint(5, 30))) + "\n")
    lines = [json.dumps({"text": text(rng.randint(1, 60))}) for _ in range(300)]
    lines[10:10] = ["", "   "]
    (root / "records.jsonl").write_bytes(("\n".join(lines[:150]) + "\r\n" + "\r\n".join(lines[150:]) + "\n").encode())
    pq.write_table(pa.table({"text": [text(rng.randint(1, 50)) for _ in range(200)]}), str(root / "rows.parquet"),
                   row_group_size=16)
    return str(root)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tk.Tokenizer:
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(10)]
    return tk.train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300)


@pytest.fixture
def small_units(monkeypatch):
    """Units of ~2 kB, and a worker pool for any source, so that a tiny corpus has many units."""
    monkeypatch.setattr(units, "UNIT_BYTES", 2000)
    monkeypatch.setattr(parallel, "POOL_MIN_UNITS", 2)


def _config(corpus: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": {"source": f"files:{corpus}/*", "val_fraction": 0.2, **fields},
                                      "tokenizer": {"vocab_size": 300}})


def _cache(run) -> dict[str, bytes]:
    """The token cache's stream files, by name."""
    (cache,) = [d for d in os.listdir(run / "data") if d.startswith("files-")]
    return {name: (run / "data" / cache / name).read_bytes() for name in ("train.bin", "val.bin")}


def _prepare(corpus, run, tok, index: int = 0, count: int = 1, **fields) -> data.Dataset:
    return data.prepare(*typed_sections(_config(corpus, **fields)), RunDir.at(str(run)), tokenizer=tok,
                        process_index=index, process_count=count)


def test_the_cache_is_byte_identical_for_1_2_and_3_workers(tmp_path, corpus, tok, small_units, monkeypatch):
    source = data.sources.resolve(data.parse_source(f"files:{corpus}/*")[0], data.DataConfig(source="stdlib"))
    kinds = [u.format for u in source.units]
    assert len(source.units) > 6 and {"text", "jsonl", "parquet"} <= set(kinds)
    assert sum(u.format == "jsonl" and u.first == -1 for u in source.units) >= 2  # ranges past the first
    caches, real = [], parts.encode_part

    def noting_pid(*a, **k):  # runs where the unit is encoded (worker processes inherit it)
        with open(tmp_path / "pids", "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*a, **k)

    monkeypatch.setattr(parts, "encode_part", noting_pid)
    for workers in (1, 2, 3):
        (tmp_path / "pids").write_text("")
        _prepare(corpus, tmp_path / f"run{workers}", tok, workers=workers)
        caches.append(_cache(tmp_path / f"run{workers}"))
        pids = set((tmp_path / "pids").read_text().split())
        assert pids == {str(os.getpid())} if workers == 1 else (len(pids) == workers and str(os.getpid()) not in pids)
    assert caches[0] == caches[1] == caches[2]
    # ... and the same as one unit per file (the cut does not matter either).
    monkeypatch.setattr(units, "UNIT_BYTES", 1 << 30)
    monkeypatch.setattr(parts, "encode_part", real)
    _prepare(corpus, tmp_path / "whole", tok, workers=1)
    assert _cache(tmp_path / "whole") == caches[0]
    assert not [p for p in os.listdir(tmp_path / "run2" / "data") if p.endswith(".parts")]  # parts cleaned up


def test_the_cache_is_byte_identical_for_1_and_2_hosts_which_share_the_work(tmp_path, corpus, tok, small_units,
                                                                             monkeypatch):
    _prepare(corpus, tmp_path / "one", tok, workers=1)
    encoded_by: dict[str, int] = {}
    real = parts.encode_part

    def counted(*a, **k):
        name = threading.current_thread().name
        encoded_by[name] = encoded_by.get(name, 0) + 1
        return real(*a, **k)

    monkeypatch.setattr(parts, "encode_part", counted)
    results: list = [None, None]

    def host(i: int) -> None:
        try:
            results[i] = _prepare(corpus, tmp_path / "pod", tok, i, 2, workers=1, host_wait_s=60.0)
        except Exception as e:  # handed to the test
            results[i] = e

    threads = [threading.Thread(target=host, args=(i,), name=f"host{i}") for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(isinstance(r, data.Dataset) for r in results), results
    assert _cache(tmp_path / "pod") == _cache(tmp_path / "one")
    assert encoded_by.get("host0", 0) > 2 and encoded_by.get("host1", 0) > 2  # both hosts encoded parts
    for a, b in zip(results[0].train + results[0].val, results[1].train + results[1].val):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_a_preparation_interrupted_halfway_resumes_with_the_parts_it_finished(tmp_path, corpus, tok, small_units,
                                                                             monkeypatch):
    _prepare(corpus, tmp_path / "clean", tok, workers=1)
    real, calls = parts.encode_part, []

    def dies_after_three(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process killed while it encodes the fourth unit
        return real(*a, **k)

    monkeypatch.setattr(parts, "encode_part", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        _prepare(corpus, tmp_path / "run", tok, workers=1)
    (left,) = [p for p in os.listdir(tmp_path / "run" / "data") if p.endswith(".parts")]
    assert len([n for n in os.listdir(tmp_path / "run" / "data" / left) if n.endswith(".json")]) == 3

    calls.clear()
    monkeypatch.setattr(parts, "encode_part", lambda *a, **k: calls.append(1) or real(*a, **k))
    _prepare(corpus, tmp_path / "run", tok, workers=1)
    n_units = len(data.sources.resolve(data.parse_source(f"files:{corpus}/*")[0], data.DataConfig()).units)
    assert len(calls) == n_units - 3  # only the missing parts were encoded
    assert _cache(tmp_path / "run") == _cache(tmp_path / "clean")
