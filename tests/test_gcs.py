"""gs:// data against a local GCS emulator: files: and pairs: globs in a bucket, the tokenizer and
token cache written to a gs:// workdir and reused, each host's local copy of the cache."""

from __future__ import annotations

import json
import os
import random

import ml_collections
import numpy as np
import pytest
from etils import epath

from gcs_emulator import gcs_bucket  # noqa: F401  (a fixture)
from gptjax import data
from gptjax import tokenizer as tk
from gptjax.data import cache as token_cache
from gptjax.data import storage
from gptjax.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _texts(n: int) -> dict[str, str]:
    rng = random.Random(0)
    return {f"doc{i:02d}.txt": "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(30)) + "\n"
            for i in range(n)}


def _pairs() -> str:
    return "".join(json.dumps({"prompt": f"Q{i}: {WORDS[i % 12]}?", "completion": f" {WORDS[(i * 5) % 12]}."}) + "\n"
                   for i in range(40))


def _write(root, files: dict[str, str]) -> None:
    """The same files under a local directory or a gs:// prefix."""
    for name, text in files.items():
        path = epath.Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _config(source: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"source": source, "val_fraction": 0.2},
        "tokenizer": {"vocab_size": 300, "model_type": "bpe", "max_chars": 100_000},
    })


@pytest.fixture
def host_cache(tmp_path, monkeypatch):
    """This host's local disk for copies of bucket caches (a fresh one per call of `new`)."""
    def new(name: str) -> str:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))
        return os.path.join(tmp_path / name, "gptjax", "data")
    return new


def test_prepare_reads_a_bucket_and_writes_its_tokenizer_and_cache_there(gcs_bucket, tmp_path, host_cache,
                                                                         monkeypatch, capfd):
    files = {**{f"corpus/{k}": v for k, v in _texts(10).items()}, "qa/qa.jsonl": _pairs()}
    _write(f"gs://{gcs_bucket}", files)
    _write(tmp_path / "local", files)
    source = "files:{0}/corpus/*.txt + pairs:{0}/qa/*.jsonl"
    workdir = f"gs://{gcs_bucket}/run"

    host0 = host_cache("host0")
    ds = data.prepare(_config(source.format(f"gs://{gcs_bucket}")), workdir, process_index=0, process_count=1)
    err = capfd.readouterr().err
    assert f"saved to {workdir}/tokenizer" in err and err.count(f"cached in {workdir}/data/") == 2
    assert epath.Path(workdir, "tokenizer", tk.META_FILE).exists()
    caches = sorted(p.name for p in epath.Path(workdir, "data").iterdir())
    assert [c.split("-")[0] for c in caches] == ["files", "pairs"] and sorted(os.listdir(host0)) == caches
    for c in caches:
        meta = json.loads(epath.Path(workdir, "data", c, "meta.json").read_text())
        assert meta["train"]["tokens"] > 100 and epath.Path(workdir, "data", c, "train.bin").stat().length == \
            meta["train"]["tokens"] * 2
    assert ds.train[1].mask is not None and 0 < ds.train[1].mask.mean() < 1  # pairs: only completions train

    # The same files on local disk give the same tokenizer and the same token streams.
    local = data.prepare(_config(source.format(tmp_path / "local")), str(tmp_path / "run"),
                         process_index=0, process_count=1)
    assert local.tokenizer.fingerprint() == ds.tokenizer.fingerprint()
    for a, b in zip(ds.train + ds.val, local.train + local.val):
        np.testing.assert_array_equal(a.tokens, b.tokens)

    # Another host (fresh local disk) and a restarted run reuse what the bucket holds.
    monkeypatch.setattr(tk, "train_sentencepiece", lambda *a, **k: pytest.fail("the tokenizer was retrained"))
    monkeypatch.setattr(token_cache, "write_streams", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    for i, disk in ((1, "host1"), (0, "host0")):
        host_cache(disk)
        again = data.prepare(_config(source.format(f"gs://{gcs_bucket}")), workdir, process_index=i, process_count=2)
        assert again.tokenizer.fingerprint() == ds.tokenizer.fingerprint()
        for a, b in zip(again.train + again.val, ds.train + ds.val):
            np.testing.assert_array_equal(a.tokens, b.tokens)
    assert sorted(os.listdir(tmp_path / "host1" / "gptjax" / "data")) == caches
    err = capfd.readouterr().err
    assert "loaded from gs://" in err and err.count("token cache reused: gs://") == 2


def test_tokenizers_save_to_and_load_from_a_bucket(gcs_bucket, tmp_path):
    texts = list(_texts(10).values())
    spm = tk.train_sentencepiece(texts, str(tmp_path / "spm"), vocab_size=300)
    spm.save(f"gs://{gcs_bucket}/spm")
    assert tk.load_tokenizer(f"gs://{gcs_bucket}/spm").fingerprint() == spm.fingerprint()

    bpe = tk.GPT2BPETokenizer.from_files(_gpt2_files(tmp_path / "bpe", texts))
    bpe.save(f"gs://{gcs_bucket}/bpe")
    names = {p.name for p in epath.Path(f"gs://{gcs_bucket}/bpe").iterdir()}
    assert {"tokenizer.json", "vocab.json", "merges.txt", tk.META_FILE} <= names
    assert tk.load_tokenizer(f"gs://{gcs_bucket}/bpe").fingerprint() == bpe.fingerprint()
    epath.Path(f"gs://{gcs_bucket}/bpe/tokenizer.json").unlink()
    epath.Path(f"gs://{gcs_bucket}/bpe/{tk.META_FILE}").unlink()
    again = tk.load_tokenizer(f"gs://{gcs_bucket}/bpe")  # vocab.json + merges.txt, as Hugging Face keeps them
    assert again.encode(texts[0]) == bpe.encode(texts[0])
    assert not tk.tokenizer_saved(f"gs://{gcs_bucket}/nothing") and tk.tokenizer_saved(f"gs://{gcs_bucket}/spm")


def _gpt2_files(directory, texts: list[str]) -> str:
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=[tk.EOT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def test_bucket_globs(gcs_bucket):
    _write(f"gs://{gcs_bucket}", {"a/x.txt": "1", "a/y.jsonl": "{}", "a/b/z.txt": "2"})
    assert storage.glob_files(f"gs://{gcs_bucket}/a/*.txt") == [f"gs://{gcs_bucket}/a/x.txt"]
    assert sorted(storage.glob_files(f"gs://{gcs_bucket}/a/*/*.txt")) == [f"gs://{gcs_bucket}/a/b/z.txt"]
    assert storage.glob_files(f"gs://{gcs_bucket}/a/x.txt") == [f"gs://{gcs_bucket}/a/x.txt"]
    with pytest.raises(UserError, match="matches no files; give"):
        data.prepare(_config(f"files:gs://{gcs_bucket}/nothing/*.txt"), f"gs://{gcs_bucket}/run",
                     tokenizer=None, process_index=0, process_count=1)
    with pytest.raises(UserError, match=r"'\*\*' is not supported in a URL"):
        data.prepare(_config(f"files:gs://{gcs_bucket}/**/*.txt"), f"gs://{gcs_bucket}/run",
                     process_index=0, process_count=1)


def test_a_tfds_dataset_in_a_bucket_is_read(gcs_bucket, tmp_path):
    from test_data import GptjaxTinyText

    GptjaxTinyText(data_dir=str(tmp_path / "tfds")).download_and_prepare(file_format="array_record")
    for path in (tmp_path / "tfds").rglob("*"):
        if path.is_file():
            storage.copy_file(str(path), f"gs://{gcs_bucket}/tfds/{path.relative_to(tmp_path / 'tfds')}")
    config = _config("tfds:gptjax_tiny_text")
    config.data.update({"tfds_data_dir": f"gs://{gcs_bucket}/tfds", "tfds_feature": "content"})
    local = _config("tfds:gptjax_tiny_text")
    local.data.update({"tfds_data_dir": str(tmp_path / "tfds"), "tfds_feature": "content"})
    ds = data.prepare(config, f"gs://{gcs_bucket}/run", process_index=0, process_count=1)
    ref = data.prepare(local, str(tmp_path / "run"), tokenizer=ds.tokenizer, process_index=0, process_count=1)
    np.testing.assert_array_equal(ds.train[0].tokens, ref.train[0].tokens)

    config.data.tfds_data_dir = f"gs://{gcs_bucket}/elsewhere"
    with pytest.raises(UserError, match="TFDS cannot write array_record files to a bucket; prepare it on local disk"):
        data.prepare(config, f"gs://{gcs_bucket}/run2", process_index=0, process_count=1)


def test_a_waiting_host_sees_files_another_process_writes_after_it_listed(gcs_bucket):
    import threading
    import time

    import gcsfs

    from gptjax.data import hosts as hosts_lib

    tokenizer = f"gs://{gcs_bucket}/run/tokenizer"
    epath.Path(tokenizer, "tokenizer.model").write_text("x")
    assert [p.name for p in epath.Path(tokenizer).iterdir()] == ["tokenizer.model"]  # a listing gcsfs keeps
    host0 = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)  # another process's client
    threading.Timer(0.5, lambda: host0.pipe(f"{gcs_bucket}/run/tokenizer/{tk.META_FILE}", b"{}")).start()
    start = time.monotonic()
    hosts = hosts_lib.Hosts(1, 2, 5.0, f"gs://{gcs_bucket}/run/data/{hosts_lib.STATUS_FILE}")
    hosts_lib.wait_for(lambda: tk.tokenizer_saved(tokenizer), tokenizer, "the tokenizer", hosts)
    assert time.monotonic() - start < 4
