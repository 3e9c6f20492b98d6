"""gs:// against a local GCS emulator: files: and pairs: globs in a bucket, the tokenizer and
token cache written to a gs:// workdir and reused, each host's local copy of the cache; what
orbax's array writer (tensorstore) needs of the emulator; a run in a bucket that trains,
resumes and samples; a damaged checkpoint in a bucket set aside; Hugging Face directories and
the converter in a bucket."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath

from conftest import FAST_COMPILE
from gcs_emulator import gcs_bucket  # noqa: F401  (a fixture)
from gptjax import data, storage
from gptjax import tokenizer as tk
from gptjax.tokenizer import workdir as tk_workdir
from gptjax.data import cache as token_cache
from gptjax.errors import UserError
from gptjax.layout import RunDir
from test_data import typed_sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    ds = data.prepare(*typed_sections(_config(source.format(f"gs://{gcs_bucket}"))), RunDir.at(workdir), process_index=0, process_count=1)
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
    local = data.prepare(*typed_sections(_config(source.format(tmp_path / "local"))), RunDir.at(str(tmp_path / "run")),
                         process_index=0, process_count=1)
    assert local.tokenizer.fingerprint() == ds.tokenizer.fingerprint()
    for a, b in zip(ds.train + ds.val, local.train + local.val):
        np.testing.assert_array_equal(a.tokens, b.tokens)

    # Another host (fresh local disk) and a restarted run reuse what the bucket holds.
    monkeypatch.setattr(tk_workdir, "train_sentencepiece", lambda *a, **k: pytest.fail("the tokenizer was retrained"))
    monkeypatch.setattr(token_cache, "write_streams", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    for i, disk in ((1, "host1"), (0, "host0")):
        host_cache(disk)
        again = data.prepare(*typed_sections(_config(source.format(f"gs://{gcs_bucket}"))), RunDir.at(workdir), process_index=i, process_count=2)
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
        data.prepare(*typed_sections(_config(f"files:gs://{gcs_bucket}/nothing/*.txt")), RunDir.at(f"gs://{gcs_bucket}/run"),
                     tokenizer=None, process_index=0, process_count=1)
    with pytest.raises(UserError, match=r"'\*\*' is not supported in a URL"):
        data.prepare(*typed_sections(_config(f"files:gs://{gcs_bucket}/**/*.txt")), RunDir.at(f"gs://{gcs_bucket}/run"),
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
    ds = data.prepare(*typed_sections(config), RunDir.at(f"gs://{gcs_bucket}/run"), process_index=0, process_count=1)
    ref = data.prepare(*typed_sections(local), RunDir.at(str(tmp_path / "run")), tokenizer=ds.tokenizer, process_index=0, process_count=1)
    np.testing.assert_array_equal(ds.train[0].tokens, ref.train[0].tokens)

    config.data.tfds_data_dir = f"gs://{gcs_bucket}/elsewhere"
    with pytest.raises(UserError, match="TFDS cannot write array_record files to a bucket; prepare it on local disk"):
        data.prepare(*typed_sections(config), RunDir.at(f"gs://{gcs_bucket}/run2"), process_index=0, process_count=1)


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


def test_the_emulator_answers_tensorstore_as_gcs_does(gcs_bucket):
    """What orbax's array writer relies on: the generation a read reports, writes and reads on
    condition of it, and deleting a range of keys."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "gcs", "bucket": gcs_bucket, "path": "kv/"}).result()
    written = kv.write("a", b"1").result().generation
    read = kv.read("a").result()
    assert read.value == b"1" and read.stamp.generation == written
    again = kv.write("a", b"2", if_equal=written).result().generation
    assert again not in (b"", written)
    assert kv.write("a", b"3", if_equal=written).result().generation == b""  # stale: not written
    assert kv.read("a").result().value == b"2" and kv.read("a", if_not_equal=again).result().state == "unspecified"

    for key in "bcd":
        kv.write(key, key.encode()).result()
    epath.Path(f"gs://{gcs_bucket}/elsewhere.txt").write_text("kept")
    kv.delete_range(ts.KvStore.KeyRange("b", "d")).result()
    assert kv.list().result() == [b"a", b"d"]
    assert epath.Path(f"gs://{gcs_bucket}/elsewhere.txt").read_text() == "kept"


def _gcs_run_config(path, source: str, steps: int) -> str:
    """A tiny run, saved at step 3 and at the end, with a given peak for MFU (no matmul is
    timed to measure one)."""
    path.write_text(
        "from gptjax.config import base_config\n\n\ndef get_config():\n"
        "    c = base_config()\n"
        f"    c.data.source = {source!r}\n"
        "    c.data.val_fraction = 0.2\n"
        "    c.tokenizer.vocab_size = 300\n"
        "    c.model.update(n_layer=1, n_head=2, n_embd=16, block_size=16)\n"
        f"    c.train.update(steps={steps}, batch_size=4, seq_len=16, eval_batches=0, log_every=1, checkpoint_every=3,\n"
        "                   peak_tflops=1.0)\n"
        "    c.optim.update(schedule='constant', warmup_steps=1)\n"
        "    return c\n"
    )
    return str(path)


def _gptjax(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """A gptjax command in a fresh process on one CPU device, with the emulator's settings
    (os.environ, set by the fixture) and its own host-local cache. These processes share the
    session's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, from conftest), so only
    the first compiles the training step; LLVM's optimizations are off, which cuts XLA's compile
    time on a CPU (most of these short runs' time) and computes the same (conftest.FAST_COMPILE)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
           "XDG_CACHE_HOME": str(tmp_path / "host-cache"), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_a_run_in_a_bucket_trains_resumes_and_samples(gcs_bucket, tmp_path):
    """A run that stopped after logging its last steps but before saving them resumes from its
    checkpoint in the bucket and ends where the uninterrupted run ended."""
    from gptjax.layout import RunDir
    from gptjax.sampling import load

    _write(f"gs://{gcs_bucket}", {f"corpus/{k}": v for k, v in _texts(6).items()})
    config = _gcs_run_config(tmp_path / "run.py", f"files:gs://{gcs_bucket}/corpus/*.txt", steps=5)
    workdir = f"gs://{gcs_bucket}/runs/tiny"
    run = RunDir.at(workdir)
    records = lambda: [json.loads(line) for line in epath.Path(run.metrics).read_text().splitlines()]
    greedy = lambda model: model.generate("alpha", max_new_tokens=6, temperature=0.0, stop_tokens=())[0]

    first = _gptjax(["-m", "gptjax.train", "--config", config, "--workdir", workdir], tmp_path)
    assert f"workdir {workdir}: a new run" in first.stdout and "saved to gs://" in first.stderr
    assert run.steps() == [3, 5] and [r["step"] for r in records()] == [1, 2, 3, 4, 5]
    uninterrupted, uninterrupted_records = load(run.checkpoint(5)), records()
    epath.Path(run.checkpoint(5)).rmtree()
    assert run.steps() == [3]

    second = _gptjax(["-m", "gptjax.train", "--config", config, "--workdir", workdir], tmp_path)
    assert f"workdir {workdir}: resuming from step 3" in second.stdout and "token cache reused: gs://" in second.stderr
    assert len(list(epath.Path(run.tensorboard).glob("events.out.tfevents.*"))) == 2
    assert [r["step"] for r in records()] == [1, 2, 3, 4, 5]  # steps 4 and 5 once, from the resumed run
    np.testing.assert_allclose([r["loss"] for r in records()], [r["loss"] for r in uninterrupted_records],
                               rtol=0, atol=1e-5)
    resumed = load(workdir)  # the newest checkpoint, which this process has not listed yet
    for got, want in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(uninterrupted.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    assert greedy(resumed) == greedy(uninterrupted)


def test_a_bucket_runs_metrics_and_events_are_written_locally_and_uploaded_through_storage(gcs_bucket, monkeypatch):
    """tensorboardX's own bucket writer is never used (it uploads again when collected at exit,
    retrying for minutes where the bucket is out of reach): the events file is written locally
    and uploaded with metrics.jsonl, and the local copies are removed on close."""
    from tensorboardX import record_writer

    from gptjax.metrics import MetricsWriter
    from test_reliability import _events

    def refuse(*args, **kwargs):
        raise AssertionError("tensorboardX wrote to the bucket itself")

    monkeypatch.setattr(record_writer.GCSRecordWriter, "__init__", refuse)
    run = RunDir.at(f"gs://{gcs_bucket}/runs/events")
    local = os.path.join(tempfile.mkdtemp(prefix="gptjax-metrics-"), "metrics.jsonl")
    writer = MetricsWriter(local, run.tensorboard, 0, None, run.metrics)
    for step in (1, 2):
        writer.write(step, {"loss": float(step)})
    writer.close()
    assert [json.loads(line)["step"] for line in epath.Path(run.metrics).read_text().splitlines()] == [1, 2]
    (events,) = epath.Path(run.tensorboard).glob("events.out.tfevents.*")
    copy = os.path.join(tempfile.mkdtemp(), "events")
    storage.copy_file(str(events), copy)
    scalars = [(e.step, v.tag, v.simple_value) for e in _events(copy) for v in e.summary.value]
    assert scalars == [(1, "loss", 1.0), (2, "loss", 2.0)]
    assert not os.path.exists(os.path.dirname(local))


def test_a_damaged_checkpoint_in_a_bucket_is_set_aside_and_the_previous_used(gcs_bucket, tmp_path, monkeypatch,
                                                                               capsys):
    import fsspec
    import jax.numpy as jnp

    from gptjax import checkpoint as ckpt
    from gptjax.layout import RunDir

    monkeypatch.chdir(tmp_path)
    run_dir = RunDir.at(f"gs://{gcs_bucket}/run")
    checkpointer = ckpt.Checkpointer(run_dir, keep=10, async_save=False)
    for step in (10, 20):
        checkpointer.save(step, {"w": jnp.full((8, 8), float(step))}, {"mu": jnp.zeros((8,))})
    checkpointer.close()
    bucket = fsspec.filesystem("gs")
    for name in bucket.find(run_dir.checkpoint(20)):  # every object cut to half its bytes
        bucket.pipe_file(name, bucket.cat_file(name)[: bucket.size(name) // 2])

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = ({"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=one)},
                {"mu": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=one)})
    checkpointer = ckpt.Checkpointer(run_dir, keep=10)
    params, _, data = checkpointer.restore_latest(*abstract)
    checkpointer.close()
    assert data["step"] == 10 and float(params["w"][0, 0]) == 10.0
    err = capsys.readouterr().err
    assert f"checkpoint 20 in {run_dir.checkpoints} is unreadable" in err
    assert f"moved to gs://{gcs_bucket}/run/unreadable/20; trying checkpoint 10" in err
    assert run_dir.steps() == [10] and epath.Path(f"gs://{gcs_bucket}/run/unreadable/20/_CHECKPOINT_METADATA").exists()
    assert os.listdir(tmp_path) == []  # no local folder named after the URL


def test_hugging_face_directories_in_a_bucket(gcs_bucket, tmp_path):
    from hf_fixtures import build_hf_dir

    from gptjax import hf

    local = build_hf_dir(str(tmp_path / "hf"), n_layer=1, n_embd=32, n_head=2)
    for name in os.listdir(local):
        storage.copy_file(os.path.join(local, name), f"gs://{gcs_bucket}/hf/{name}")
    fields, params, tokenizer = hf.load_hf_dir(local)
    assert hf.read_hf_config(f"gs://{gcs_bucket}/hf") == fields

    def same(directory: str) -> None:
        f, p, t = hf.load_hf_dir(directory)
        assert f == fields and t.fingerprint() == tokenizer.fingerprint()
        got, want = _flat(p), _flat(params)
        assert got.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)

    same(f"gs://{gcs_bucket}/hf")
    hf.export_hf_dir(fields, params, tokenizer, f"gs://{gcs_bucket}/exported")
    same(f"gs://{gcs_bucket}/exported")
    with pytest.raises(UserError, match="already exists and is not an empty directory"):
        hf.require_new_dir(f"gs://{gcs_bucket}/exported")
    epath.Path(f"gs://{gcs_bucket}/pickled/config.json").write_text(epath.Path(local, "config.json").read_text())
    epath.Path(f"gs://{gcs_bucket}/pickled/pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(UserError, match=r"PyTorch pickle weights \(pytorch_model.bin\)"):
        hf.load_hf_dir(f"gs://{gcs_bucket}/pickled")


def test_the_converter_works_bucket_to_bucket(gcs_bucket, tmp_path, monkeypatch):
    """import (init_from=hf:gs://...) writes a run in the bucket; export reads it back."""
    from hf_fixtures import build_hf_dir

    from gptjax import hf

    monkeypatch.syspath_prepend(os.path.join(ROOT, "tools"))
    import convert_hf

    local = build_hf_dir(str(tmp_path / "hf"), n_layer=1, n_embd=32, n_head=2)
    for name in os.listdir(local):
        storage.copy_file(os.path.join(local, name), f"gs://{gcs_bucket}/hf/{name}")
    convert_hf.main(["import", "--hf_dir", f"gs://{gcs_bucket}/hf", "--out", f"gs://{gcs_bucket}/run"])
    convert_hf.main(["export", "--workdir", f"gs://{gcs_bucket}/run", "--out", f"gs://{gcs_bucket}/roundtrip"])
    want, got = hf.load_hf_dir(local), hf.load_hf_dir(f"gs://{gcs_bucket}/roundtrip")
    assert got[0] == want[0] and got[2].fingerprint() == want[2].fingerprint()
    for key, value in _flat(want[1]).items():
        np.testing.assert_array_equal(_flat(got[1])[key], value, err_msg=key)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
