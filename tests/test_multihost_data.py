"""Data prepared once per pod: host 0 trains the tokenizer and writes the token cache, the
other hosts wait for it; a failed or silent host 0 gives the others one line, not a hang.

Hosts are simulated by threads calling `prepare` with process_index 0 and 1 of 2 on one
shared directory, as a pod's hosts would on a shared bucket.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from gptjax import data
from gptjax import tokenizer as tk
from gptjax.tokenizer import workdir as tk_workdir
from gptjax.data import cache as token_cache
from gptjax.data import hosts as hosts_lib
from gptjax.errors import UserError
from gptjax.layout import RunDir
from test_data import typed_sections

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _corpus(directory, n_docs: int = 12) -> None:
    rng = random.Random(0)
    os.makedirs(directory, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(30)]
        (directory / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")


def _config(source: str, wait_s: float = 30.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"source": source, "val_fraction": 0.2, "host_wait_s": wait_s},
        "tokenizer": {"vocab_size": 300, "model_type": "bpe", "max_chars": 100_000},
    })



def _run_hosts(config, workdir: str, n: int = 2) -> list:
    """prepare() on n simulated hosts at once: [Dataset or the exception it raised] per host."""
    results: list = [None] * n

    def host(i: int) -> None:
        try:
            results[i] = data.prepare(*typed_sections(config), RunDir.at(workdir), process_index=i, process_count=n)
        except Exception as e:  # handed to the test
            results[i] = e

    threads = [threading.Thread(target=host, args=(i,)) for i in reversed(range(n))]  # waiters first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a host hung"
    return results


@pytest.fixture
def counted(monkeypatch):
    """Counts of tokenizer trainings and token cache writes, across all simulated hosts."""
    counts = {"trainings": 0, "cache_writes": 0}
    real_train, real_write = tk.train_sentencepiece, token_cache.write_streams

    def train(*a, **k):
        counts["trainings"] += 1
        return real_train(*a, **k)

    def write(*a, **k):
        counts["cache_writes"] += 1
        time.sleep(0.5)  # the waiting host polls while host 0 is busy
        return real_write(*a, **k)

    monkeypatch.setattr(tk_workdir, "train_sentencepiece", train)
    monkeypatch.setattr(token_cache, "write_streams", write)
    return counts


def test_a_pod_trains_the_tokenizer_and_writes_the_cache_once(tmp_path, counted, capfd):
    _corpus(tmp_path / "txt")
    config = _config(f"files:{tmp_path}/txt/*.txt")
    ds0, ds1 = _run_hosts(config, str(tmp_path / "run"))
    assert isinstance(ds0, data.Dataset) and isinstance(ds1, data.Dataset), (ds0, ds1)
    assert counted == {"trainings": 1, "cache_writes": 1}
    assert ds0.tokenizer.fingerprint() == ds1.tokenizer.fingerprint()
    for a, b in zip(ds0.train + ds0.val, ds1.train + ds1.val):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    # Each host draws its own rows of the same global batch.
    rows = [ds.get_batch(3, 4, 16, seed=0, process_index=i, process_count=2)["inputs"] for i, ds in enumerate((ds0, ds1))]
    np.testing.assert_array_equal(np.concatenate(rows), ds0.get_batch(3, 4, 16, seed=0)["inputs"])
    assert not os.path.exists(tmp_path / "run" / "data" / hosts_lib.STATUS_FILE)
    err = capfd.readouterr().err
    assert err.count("tokenizer: training SentencePiece") == 1 and err.count("cached in") == 1

    again = _run_hosts(config, str(tmp_path / "run"))  # a restarted pod reuses both
    assert counted == {"trainings": 1, "cache_writes": 1}
    np.testing.assert_array_equal(again[1].train[0].tokens, ds0.train[0].tokens)


def test_a_host_0_failure_reaches_the_other_hosts_at_once(tmp_path, counted, monkeypatch):
    _corpus(tmp_path / "txt")
    config = _config(f"files:{tmp_path}/txt/*.txt", wait_s=60.0)
    texts = [p.read_text() for p in sorted((tmp_path / "txt").iterdir())]
    tok = tk.train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=300)

    def broken(*a, **k):
        time.sleep(0.3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache, "write_streams", broken)
    start = time.monotonic()
    results: list = [None, None]

    def host(i: int) -> None:
        try:
            data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok, process_index=i, process_count=2)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=host, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(results[0], OSError)
    assert isinstance(results[1], UserError) and time.monotonic() - start < 10  # not the 60 s bound
    line = str(results[1])
    assert "\n" not in line and line.startswith("host 1: host 0 failed to prepare the data, so the token cache of files:")
    assert line.endswith("will not come: OSError: [Errno 28] No space left on device")


def test_a_silent_host_0_gives_one_line_within_the_bound(tmp_path):
    _corpus(tmp_path / "txt")
    config = _config(f"files:{tmp_path}/txt/*.txt", wait_s=1.0)
    start = time.monotonic()
    with pytest.raises(UserError) as e:  # host 0 never comes
        data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), process_index=1, process_count=2)
    assert 1.0 <= time.monotonic() - start < 5
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(f"host 1: waited 1 s without progress for the tokenizer at {tmp_path / 'run' / 'tokenizer'}")
    assert "is host 0 running" in line


def test_a_waiting_host_keeps_waiting_while_host_0_shows_progress(tmp_path):
    item, status = str(tmp_path / "item"), str(tmp_path / hosts_lib.STATUS_FILE)
    hosts0, hosts1 = hosts_lib.Hosts(0, 2, 0.5, status), hosts_lib.Hosts(1, 2, 0.5, status)
    waited: list = []

    def waiter() -> None:
        try:
            hosts_lib.wait_for(lambda: os.path.exists(item), item, "the item", hosts1)
            waited.append("done")
        except UserError as e:
            waited.append(e)

    t = threading.Thread(target=waiter)
    with hosts_lib.Beacon(hosts0):
        state = json.loads(Path(status).read_text())
        assert state["state"] == "preparing" and state["host"] == 0
        t.start()
        time.sleep(2.0)  # four times the bound: the heartbeat keeps the waiter patient
        os.mkdir(item)
    t.join(timeout=10)
    assert waited == ["done"] and not os.path.exists(status)


def test_a_failure_left_by_an_earlier_attempt_is_not_this_attempts(tmp_path):
    status = tmp_path / hosts_lib.STATUS_FILE
    status.write_text(json.dumps({"state": "failed", "error": "old trouble", "host": 0,
                                  "time": time.time() - 2 * hosts_lib.START_SKEW_S}))
    with pytest.raises(UserError, match=r"waited 0.5 s without progress .*earlier attempt of host 0 failed: old trouble"):
        hosts_lib.wait_for(lambda: False, "item", "the item", hosts_lib.Hosts(1, 2, 0.5, str(status)))


def test_a_host_0_failure_before_any_item_reaches_the_others(tmp_path, monkeypatch):
    """Host 0 fails while reading its sources (here: a TFDS download), before it builds anything."""
    from test_data import GptjaxTinyText

    def offline(self, *a, **k):
        raise ConnectionError("no route to the download server")

    monkeypatch.setattr(GptjaxTinyText, "download_and_prepare", offline)
    config = _config("tfds:gptjax_tiny_text", wait_s=60.0)
    config.data.update({"tfds_data_dir": str(tmp_path / "tfds"), "tfds_feature": "content"})
    tok_dir = tmp_path / "run" / "tokenizer"
    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(400)) for i in range(20)]
    tk.train_sentencepiece(texts, str(tok_dir), vocab_size=300)
    results: list = [None, None]

    def host(i: int) -> None:
        try:
            data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), process_index=i, process_count=2)
        except Exception as e:
            results[i] = e

    start = time.monotonic()
    threads = [threading.Thread(target=host, args=(i,)) for i in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(results[0], ConnectionError) and time.monotonic() - start < 10
    assert str(results[1]).startswith("host 1: host 0 failed to prepare the data, so the token cache of "
                                      "tfds:gptjax_tiny_text at ")
    assert str(results[1]).endswith("will not come: ConnectionError: no route to the download server")


def test_a_waiting_host_does_not_download_a_tfds_dataset(tmp_path):
    import tensorflow_datasets as tfds

    from test_data import GptjaxTinyText  # noqa: F401  (registers the dataset)

    config = _config("tfds:gptjax_tiny_text", wait_s=0.5)
    config.data.update({"tfds_data_dir": str(tmp_path / "tfds"), "tfds_feature": "content"})
    tok_dir = tmp_path / "run" / "tokenizer"
    texts = [" ".join(random.Random(i).choice(WORDS) for _ in range(400)) for i in range(20)]
    tk.train_sentencepiece(texts, str(tok_dir), vocab_size=300)
    with pytest.raises(UserError, match="host 1: waited 0.5 s without progress for the token cache of tfds:"):
        data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), process_index=1, process_count=2)
    assert not tfds.builder("gptjax_tiny_text", data_dir=str(tmp_path / "tfds")).is_prepared()
