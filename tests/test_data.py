"""Data: sources, cached token streams, deterministic batches, mixtures, masks and bad input."""

from __future__ import annotations

import json
import os
import random

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gptjax import data
from gptjax.data import cache as token_cache
from gptjax.data import parts, sources, units
from gptjax import tokenizer as tk
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.schema import DataConfig, TokenizerConfig, parse

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _doc(rng: random.Random, n_words: int) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(max(1, n_words // 8))]
    return "\n".join(lines) + "\n"


def _config(source: str, **data_fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "data": {"source": source, "val_fraction": 0.2, **data_fields},
        "tokenizer": {"vocab_size": 300, "model_type": "bpe", "max_chars": 200_000},
    })


def typed_sections(config: ml_collections.ConfigDict) -> tuple[DataConfig, TokenizerConfig]:
    """The sections `data.prepare` takes, parsed from a test's small config."""
    return parse(DataConfig, config.data, "data"), parse(TokenizerConfig, config.get("tokenizer", {}), "tokenizer")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> tk.Tokenizer:
    rng = random.Random(0)
    corpus = [_doc(rng, 200) for _ in range(20)] + ["QUESTION? ANSWER: xyz XYZ!\n"] * 50
    return tk.train_sentencepiece(corpus, str(tmp_path_factory.mktemp("tok")), vocab_size=300)


def _write_txt(directory, n_docs: int, n_words: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    docs = [_doc(rng, n_words) for _ in range(n_docs)]
    for i, d in enumerate(docs):
        with open(os.path.join(directory, f"doc{i:03d}.txt"), "w") as f:
            f.write(d)
    return docs


def _write_jsonl(path, records: list) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _all_text(tok: tk.Tokenizer, ds: data.Dataset) -> str:
    return "".join(tok.decode(np.asarray(s.tokens)) for s in ds.train + ds.val)


# --- sources -----------------------------------------------------------------------------------


def test_stdlib_files_are_the_standard_library_without_tests():
    paths = data.stdlib_files()
    assert len(paths) > 300 and paths == sorted(paths)
    assert all(p.endswith(".py") for p in paths)
    parts = {part for p in paths for part in p.split(os.sep)}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert any(p.endswith(os.path.join("json", "decoder.py")) for p in paths)


def test_stdlib_source_trains_a_tokenizer_and_caches(tmp_path):
    config = _config("stdlib", val_fraction=0.05)
    config.tokenizer.max_chars = 300_000
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path)))
    assert ds.tokenizer.kind == "sentencepiece" and ds.tokenizer.vocab_size == 300
    assert os.path.isfile(tmp_path / "tokenizer" / tk.META_FILE)
    assert ds.train_tokens > 2_000_000 and 0.01 < ds.val_tokens / (ds.train_tokens + ds.val_tokens) < 0.15
    assert "def " in ds.tokenizer.decode(ds.get_batch(0, 4, 256, seed=0)["inputs"].ravel())
    again = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path)))  # tokenizer and streams are reused
    assert again.tokenizer.fingerprint() == ds.tokenizer.fingerprint()
    np.testing.assert_array_equal(again.val[0].tokens, ds.val[0].tokens)


def test_txt_files_one_document_each_joined_with_eot(tmp_path, tok):
    docs = _write_txt(tmp_path / "txt", 12)
    ds = data.prepare(*typed_sections(_config(f"files:{tmp_path}/txt/*.txt")), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    assert ds.sources == [f"files:{tmp_path}/txt/*.txt"]
    streams = ds.train + ds.val
    assert sum(int((np.asarray(s.tokens) == tok.eot_id).sum()) for s in streams) == len(docs)
    assert all(s.tokens[-1] == tok.eot_id and s.mask is None for s in streams)
    pieces = _all_text(tok, ds).split(tk.EOT)[:-1]
    assert sorted(pieces) == sorted(docs)
    assert ds.train[0].tokens.dtype == np.uint16


def test_jsonl_one_document_per_line_with_configurable_field(tmp_path, tok):
    records = [{"body": f"gamma {i} delta", "id": i} for i in range(30)]
    _write_jsonl(tmp_path / "a.jsonl", records[:20] + [""])  # blank lines are skipped
    _write_jsonl(tmp_path / "b.jsonl", records[20:])
    config = _config(f"files:{tmp_path}/a.jsonl,{tmp_path}/b.jsonl", text_field="body")
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    pieces = _all_text(tok, ds).split(tk.EOT)[:-1]
    assert sorted(pieces) == sorted(r["body"] for r in records)


def test_long_text_file_is_read_in_pieces_and_round_trips(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(units, "TEXT_CHUNK_CHARS", 1000)
    monkeypatch.setattr(parts, "ENCODE_BATCH_CHARS", 3000)
    text = _write_txt(tmp_path / "one", 1, n_words=4000)[0]
    ds = data.prepare(*typed_sections(_config(f"files:{tmp_path}/one/*.txt")), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    assert _all_text(tok, ds) == text + tk.EOT  # one document: train is its head, val its tail
    assert ds.train[0].tokens[-1] != tok.eot_id and ds.val[0].tokens[-1] == tok.eot_id
    assert 0.15 < ds.val_tokens / (ds.train_tokens + ds.val_tokens) < 0.25


def test_a_single_document_hashed_to_validation_is_split_too(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources, "is_val", lambda key, fraction: True)
    text = _write_txt(tmp_path / "one", 1, n_words=2000)[0]
    ds = data.prepare(*typed_sections(_config(f"files:{tmp_path}/one/*.txt")), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    assert _all_text(tok, ds) == text + tk.EOT
    assert 0.15 < ds.val_tokens / (ds.train_tokens + ds.val_tokens) < 0.25


def test_long_texts_are_cut_after_newlines(monkeypatch):
    monkeypatch.setattr(units, "TEXT_CHUNK_CHARS", 10)
    text = "0123456789abc\nd\n" + "x" * 35
    pieces = [p for p, trained in units.pieces(text)]
    assert "".join(pieces) == text and pieces[0] == "0123456789abc\n" and all(len(p) <= 20 for p in pieces)


def test_every_split_gets_a_document(tmp_path, tok):
    _write_txt(tmp_path / "txt", 3)
    for fraction in (0.01, 0.99):
        config = _config(f"files:{tmp_path}/txt/*.txt", val_fraction=fraction)
        ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / f"r{fraction}")), tokenizer=tok)
        counts = [int((np.asarray(s.tokens) == tok.eot_id).sum()) for s in ds.train + ds.val]
        assert min(counts) >= 1 and sum(counts) == 3


# --- TFDS ----------------------------------------------------------------------------------------


class GptjaxTinyText(tfds.core.GeneratorBasedBuilder):
    """A tiny text dataset built by the tests (registered as 'gptjax_tiny_text')."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "label": np.int32}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40, 0), "test": self._generate_examples(5, 1)}

    def _generate_examples(self, n, seed):
        rng = random.Random(seed)
        for i in range(n):
            yield i, {"content": f"doc {seed}-{i}: " + _doc(rng, 40), "label": i}


def test_tfds_source_reads_a_locally_built_dataset(tmp_path, tok):
    GptjaxTinyText(data_dir=str(tmp_path / "tfds")).download_and_prepare(file_format="array_record")
    config = _config("tfds:gptjax_tiny_text", tfds_data_dir=str(tmp_path / "tfds"), tfds_feature="content")
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    pieces = _all_text(tok, ds).split(tk.EOT)[:-1]
    assert len(pieces) == 40 and all(p.startswith("doc 0-") for p in pieces)

    config.data.tfds_val_split = "test"
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run2")), tokenizer=tok)
    val = tok.decode(np.asarray(ds.val[0].tokens)).split(tk.EOT)[:-1]
    assert len(val) == 5 and all(p.startswith("doc 1-") for p in val)
    source = sources.resolve(data.parse_source(config.data.source)[0], typed_sections(config)[0])
    steps = []
    assert sum(1 for _ in source.documents(steps.append)) == 45 and source.unit == "doc"
    assert source.size == sum(steps) == 45  # the progress bar's total, known before reading

    with pytest.raises(UserError, match="no feature 'text'"):
        config = _config("tfds:gptjax_tiny_text", tfds_data_dir=str(tmp_path / "tfds"))
        data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "r3")), tokenizer=tok)
    with pytest.raises(UserError, match="no split 'validation'"):
        data.prepare(*typed_sections(_config("tfds:gptjax_tiny_text", tfds_data_dir=str(tmp_path / "tfds"), tfds_feature="content",
                             tfds_split="validation")), RunDir.at(str(tmp_path / "r4")), tokenizer=tok)


def test_tfds_unknown_dataset_raises(tmp_path, tok):
    with pytest.raises(UserError, match="no such TFDS dataset"):
        config = _config("tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
        data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok)


# --- batches -------------------------------------------------------------------------------------


@pytest.fixture
def txt_dataset(tmp_path, tok):
    _write_txt(tmp_path / "txt", 20)
    config = _config(f"files:{tmp_path}/txt/*.txt")
    return lambda: data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok)


def test_batches_depend_only_on_seed_and_step(txt_dataset):
    a, b = txt_dataset(), txt_dataset()  # b is a fresh object reading a's cache, as after a restart
    x = a.get_batch(7, 8, 32, seed=3)
    for key in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(x[key], b.get_batch(7, 8, 32, seed=3)[key])
    assert x["inputs"].shape == (8, 32) and x["inputs"].dtype == np.int32 and x["weights"].dtype == np.float32
    assert (x["weights"] == 1).all()
    np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
    assert not np.array_equal(x["inputs"], a.get_batch(8, 8, 32, seed=3)["inputs"])
    assert not np.array_equal(x["inputs"], a.get_batch(7, 8, 32, seed=4)["inputs"])
    stream = np.asarray(a.train[0].tokens)
    row = np.concatenate([x["inputs"][0], x["targets"][0, -1:]])
    assert any(np.array_equal(stream[i : i + 33], row) for i in range(len(stream) - 32))


class ByteTokenizer:
    """UTF-8 bytes as ids and 256 as end-of-text: streams that do not depend on a trained model."""

    kind, vocab_size, eot_id = "bytes", 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join("|" if i == self.eot_id else chr(i) for i in np.asarray(ids).tolist())

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)

    def fingerprint(self) -> str:
        return "bytes"


def test_split_and_batches_are_pinned(tmp_path):
    """The split of documents and the batch of a step, recorded once: a change here breaks the
    resumption of runs prepared before it (raise the cache format when it is meant)."""
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}: " + "abcdefghij"[i] * (20 + 3 * i) + "\n")
    config = ml_collections.ConfigDict({"data": {"source": f"files:{tmp_path}/*.txt", "val_fraction": 0.2}})
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=ByteTokenizer())
    text = ds.tokenizer.decode
    assert text(ds.val[0].tokens) == "document 5: " + "f" * 35 + "\n|"
    assert text(ds.train[0].tokens).startswith("document 0: " + "a" * 20 + "\n|document 1: ")
    batch = ds.get_batch(3, 4, 12, seed=7)
    assert [text(row) for row in batch["inputs"]] == ["hhhh\n|docume", "j" * 12, "g" * 12, "ocument 9: j"]
    assert text(ds.eval_batches(2, 8, 1)[0]["targets"][1]) == "5: fffff"


def test_host_slices_concatenate_to_the_global_batch(txt_dataset):
    ds = txt_dataset()
    full = ds.get_batch(3, 12, 16, seed=0)
    parts = [ds.get_batch(3, 12, 16, seed=0, process_index=p, process_count=4) for p in range(4)]
    for key in full:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(UserError, match="divisible"):
        ds.get_batch(3, 10, 16, seed=0, process_count=4)


def test_get_batch_is_fast(txt_dataset):
    import time

    ds = txt_dataset()
    ds.get_batch(0, 12, 64, seed=0)
    t = time.perf_counter()
    for step in range(100):
        ds.get_batch(step, 12, 64, seed=0)
    assert (time.perf_counter() - t) / 100 < 2e-3


def test_eval_batches_are_fixed_consecutive_windows(txt_dataset):
    ds = txt_dataset()
    batches = ds.eval_batches(4, 16, max_batches=3)
    assert len(batches) == 3
    val = np.asarray(ds.val[0].tokens)
    np.testing.assert_array_equal(batches[0]["inputs"][1], val[16:32])
    np.testing.assert_array_equal(batches[2]["targets"][3], val[11 * 16 + 1 : 12 * 16 + 1])
    again = ds.eval_batches(4, 16, max_batches=3)
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    halves = [ds.eval_batches(4, 16, 3, process_index=p, process_count=2) for p in range(2)]
    both = np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]])
    np.testing.assert_array_equal(both, batches[1]["inputs"])
    # asking for more than the validation text holds: all windows once, last batch padded with weight 0
    windows = (len(val) - 1) // 16
    everything = ds.eval_batches(4, 16, max_batches=10_000)
    assert len(everything) == -(-windows // 4)
    assert sum(float(b["weights"].sum()) for b in everything) == windows * 16
    assert ds.eval_batches(4, 16, max_batches=0) == []


def test_window_longer_than_the_text_raises(txt_dataset):
    ds = txt_dataset()
    with pytest.raises(UserError, match="fewer than one window"):
        ds.get_batch(0, 2, ds.train_tokens + 5, seed=0)
    with pytest.raises(UserError, match="validation text"):
        ds.eval_batches(2, ds.val_tokens + 5, 1)


# --- pairs and mixtures --------------------------------------------------------------------------


def test_pairs_train_only_on_completion_and_eot(tmp_path, tok):
    rng = random.Random(0)
    records = [{"q": "".join(rng.choice("QUESTION") for _ in range(rng.randint(3, 12))) + "?",
                "a": "".join(rng.choice("alpha beta") for _ in range(rng.randint(3, 12)))} for _ in range(60)]
    _write_jsonl(tmp_path / "qa.jsonl", records)
    config = _config(f"pairs:{tmp_path}/qa.jsonl", prompt_field="q", completion_field="a")
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    for stream in ds.train + ds.val:
        tokens, mask = np.asarray(stream.tokens), np.asarray(stream.mask)
        assert tokens.shape == mask.shape and set(np.unique(mask)) == {0, 1}
        assert (mask[tokens == tok.eot_id] == 1).all()
    batch = ds.get_batch(0, 16, 24, seed=0)
    for target, weight in zip(batch["targets"].ravel(), batch["weights"].ravel()):
        trained = target == tok.eot_id or tok.decode([target]).strip(" ").islower() or tok.decode([target]) == " "
        prompt = tok.decode([target]).rstrip("?").isupper() or tok.decode([target]) == "?"
        assert weight == (1.0 if trained and not prompt else 0.0), tok.decode([target])
    assert 0 < batch["weights"].mean() < 1


def test_mixture_rows_follow_the_weights(tmp_path, tok):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(5):
        (tmp_path / "a" / f"{i}.txt").write_text("alpha beta gamma delta\n" * 100)
        (tmp_path / "b" / f"{i}.txt").write_text("XYZ XYZ\n" * 150)
    config = _config(f"files:{tmp_path}/a/*.txt @ 3 + files:{tmp_path}/b/*.txt@1 + stdlib@0")
    ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    assert ds.sources == [f"files:{tmp_path}/a/*.txt", f"files:{tmp_path}/b/*.txt"]
    np.testing.assert_allclose(ds.weights, [0.75, 0.25])
    rows = np.concatenate([ds.get_batch(s, 16, 8, seed=0)["inputs"] for s in range(200)])
    from_b = np.array(["XYZ" in tok.decode(r) for r in rows])
    from_a = np.array([any(w in tok.decode(r) for w in ("alpha", "beta", "gamma", "delta")) for r in rows])
    assert (from_a != from_b).all()  # every row comes from exactly one source
    assert abs(from_b.mean() - 0.25) < 0.04  # 3200 rows: the standard error is 0.008
    ev = ds.eval_batches(4, 8, max_batches=4)
    ev_b = np.mean(["XYZ" in tok.decode(r) for b in ev for r in b["inputs"]])
    assert 0.1 < ev_b < 0.5


# --- the cache -----------------------------------------------------------------------------------


def _cache_dirs(run) -> list[str]:
    return sorted(d for d in os.listdir(run / "data") if not d.startswith("."))


def test_cache_is_reused_and_a_damaged_cache_is_rebuilt(tmp_path, tok, monkeypatch):
    _write_txt(tmp_path / "txt", 10)
    config = _config(f"files:{tmp_path}/txt/*.txt")
    run = tmp_path / "run"
    first = data.prepare(*typed_sections(config), RunDir.at(str(run)), tokenizer=tok)
    (cache,) = _cache_dirs(run)
    meta = json.loads((run / "data" / cache / "meta.json").read_text())
    assert meta["train"]["tokens"] == first.train_tokens and meta["dtype"] == "uint16" and not meta["has_mask"]
    assert meta["source"] == f"files:{tmp_path}/txt/*.txt" and meta["key"]["tokenizer"] == tok.fingerprint()
    expected = np.asarray(first.train[0].tokens).copy()

    real_write = token_cache.write_streams
    monkeypatch.setattr(token_cache, "write_streams", lambda *a: pytest.fail("the cache was not reused"))
    np.testing.assert_array_equal(data.prepare(*typed_sections(config), RunDir.at(str(run)), tokenizer=tok).train[0].tokens, expected)

    builds = []
    monkeypatch.setattr(token_cache, "write_streams", lambda *a: builds.append(1) or real_write(*a))
    train_bin = run / "data" / cache / "train.bin"
    damage = [lambda: os.truncate(train_bin, os.path.getsize(train_bin) - 2),  # a partial file
              lambda: (run / "data" / cache / "meta.json").unlink(),  # interrupted before meta
              lambda: (run / "data" / cache / "meta.json").write_text("{not json"),
              lambda: train_bin.write_bytes(train_bin.read_bytes() + b"\0\0")]
    for i, harm in enumerate(damage):
        harm()
        ds = data.prepare(*typed_sections(config), RunDir.at(str(run)), tokenizer=tok)
        assert len(builds) == i + 1
        np.testing.assert_array_equal(ds.train[0].tokens, expected)
    assert _cache_dirs(run) == [cache]
    assert not [d for d in os.listdir(run / "data") if d.startswith(".")]  # no temporary leftovers

    (tmp_path / "txt" / "doc000.txt").write_text("changed text\n")  # a changed source is a new cache
    data.prepare(*typed_sections(config), RunDir.at(str(run)), tokenizer=tok)
    assert len(_cache_dirs(run)) == 2


def test_preparation_says_what_it_did_on_stderr(tmp_path, capfd):
    _write_txt(tmp_path / "txt", 6)
    (tmp_path / "txt" / "empty.txt").write_text("")  # not a document
    config = _config(f"files:{tmp_path}/txt/*.txt")
    name = f"files:{tmp_path}/txt/*.txt"
    first = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")))
    out, err = capfd.readouterr()
    assert out == ""
    assert "tokenizer: training SentencePiece bpe with 300 pieces" in err and "tokenizer: trained on " in err
    (line,) = [x for x in err.splitlines() if x.startswith(f"{name}: 6 documents, ")]
    assert f"{first.train_tokens:,} train / {first.val_tokens:,} val tokens" in line and "cached in" in line
    assert f"tokenizing {name}" in err  # the progress bar

    data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")))
    out, err = capfd.readouterr()
    assert out == "" and "tokenizer: SentencePiece bpe, 300 pieces, loaded from" in err
    (line,) = [x for x in err.splitlines() if x.startswith(f"{name}: ")]
    assert line.startswith(f"{name}: 6 documents, ") and "token cache reused" in line
    assert "tokenizing" not in err


def test_only_process_zero_prints(tmp_path, tok, capfd, monkeypatch):
    import jax

    _write_txt(tmp_path / "txt", 3)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    data.prepare(*typed_sections(_config(f"files:{tmp_path}/txt/*.txt")), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    assert capfd.readouterr() == ("", "")


def test_progress_off_a_terminal_is_plain_lines(tmp_path, tok, capfd, monkeypatch):
    from gptjax.data import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(units, "TEXT_CHUNK_CHARS", 200)
    _write_txt(tmp_path / "txt", 4)
    name = f"files:{tmp_path}/txt/*.txt"
    data.prepare(*typed_sections(_config(name)), RunDir.at(str(tmp_path / "run")), tokenizer=tok)
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"tokenizing {name}")]
    assert lines[0].endswith("B)") and len(lines) > 4
    assert lines[-1].startswith(f"tokenizing {name}: ") and "(100%)" in lines[-1] and "/s, ETA 0 s" in lines[-1]


def test_progress_counts_every_byte_of_the_input(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "TEXT_CHUNK_CHARS", 100)
    _write_txt(tmp_path / "files", 3, n_words=300)
    (tmp_path / "files" / "ünïcode.txt").write_text("é€😀\n" * 50)
    _write_jsonl(tmp_path / "files" / "a.jsonl", [{"text": "x" * (i % 50)} for i in range(1000)] + ["", ""])
    _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "p", "completion": "c" * (i % 50)} for i in range(1000)])
    for spec in (f"files:{tmp_path}/files/*", f"pairs:{tmp_path}/qa.jsonl"):
        source = sources.resolve(data.parse_source(spec)[0], data.DataConfig(source=spec))
        seen, steps = [], []
        for doc in source.documents(steps.append):
            seen += [text for text, _ in doc.segments]
        assert source.unit == "B" and sum(steps) == source.size and len(steps) > 10 and seen


def test_workdir_tokenizer_must_match_the_config(tmp_path, tok):
    _write_txt(tmp_path / "txt", 4)
    tok.save(str(tmp_path / "run" / "tokenizer"))
    config = _config(f"files:{tmp_path}/txt/*.txt")
    assert data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run"))).tokenizer.fingerprint() == tok.fingerprint()
    config.tokenizer.vocab_size = 512
    with pytest.raises(UserError, match="use a new workdir"):
        data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / "run")))


def test_token_dtype():
    assert data.token_dtype(50257) == np.uint16 and data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source, match", [
    ("", "empty term"),
    ("stdlib + ", "empty term"),
    ("hdfs:/x", "unknown source kind 'hdfs'.*allowed"),
    ("files", "needs an argument"),
    ("stdlib:x", "takes no argument"),
    ("stdlib@-1", "must be a finite number >= 0"),
    ("stdlib@abc", "is not a number"),
    ("stdlib@0 + files:x@0", "has all mixture weights zero"),
])
def test_bad_source_specs(source, match):
    with pytest.raises(UserError, match=match):
        data.parse_source(source)


def test_bad_inputs_raise_one_line_user_errors(tmp_path, tok):
    def prepare(source, **fields):
        return data.prepare(*typed_sections(_config(source, **fields)), RunDir.at(str(tmp_path / "run")), tokenizer=tok)

    cases = []
    with pytest.raises(UserError, match="matches no files") as e:
        prepare(f"files:{tmp_path}/nothing/*.txt")
    cases.append(e)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    _write_jsonl(tmp_path / "empty" / "b.jsonl", [{"text": ""}])
    with pytest.raises(UserError, match="has no text") as e:
        prepare(f"files:{tmp_path}/empty/*")
    cases.append(e)
    _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "{oops"])
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON") as e:
        prepare(f"files:{tmp_path}/bad.jsonl")
    cases.append(e)
    _write_jsonl(tmp_path / "field.jsonl", [{"text": "fine"}, {"body": "x"}])
    with pytest.raises(UserError, match=r"field.jsonl:2: record has no string field 'text'.*data.text_field") as e:
        prepare(f"files:{tmp_path}/field.jsonl")
    cases.append(e)
    _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(UserError, match=r"qa.jsonl:2: pairs record lacks a string 'completion'") as e:
        prepare(f"pairs:{tmp_path}/qa.jsonl")
    cases.append(e)
    with pytest.raises(UserError, match="val_fraction must be in") as e:
        prepare("stdlib", val_fraction=0.0)
    cases.append(e)
    assert all("\n" not in str(c.value) for c in cases)
