"""Sources beyond text and jsonl: files gptjax does not read are refused in one line before a
tokenizer is trained; .parquet files (local and in a bucket) give the token cache the same rows
give as .jsonl; hf: reads a dataset saved with `datasets` (built here, offline)."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys

import ml_collections
import numpy as np
import pytest

from gptjax import data
from gptjax import tokenizer as tk
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.tokenizer import workdir as tk_workdir
from test_data import typed_sections

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _rows(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + "\n" for _ in range(n)]
    rows[5] = ""  # an empty row is no document, in either format
    return rows


def _config(source: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": {"source": source, "val_fraction": 0.2, "workers": 1, **fields},
                                      "tokenizer": {"vocab_size": 300, "max_chars": 100_000}})


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tk.Tokenizer:
    return tk.train_sentencepiece(_rows(200, seed=1), str(tmp_path_factory.mktemp("tok")), vocab_size=300)


def _prepare(source: str, run, tok, **fields) -> data.Dataset:
    return data.prepare(*typed_sections(_config(source, **fields)), RunDir.at(str(run)), tokenizer=tok,
                        process_index=0, process_count=1)


def _streams(ds: data.Dataset) -> list[bytes]:
    return [np.asarray(s.tokens).tobytes() for s in ds.train + ds.val]


def _write_jsonl(path, rows: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows))


def _write_parquet(path, rows: list[str], row_group_size: int = 7) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), str(path), row_group_size=row_group_size)


# --- files gptjax does not read ---------------------------------------------------------------


@pytest.mark.parametrize("name, content, what", [
    ("docs.jsonl.gz", gzip.compress(b'{"text": "hi"}\n', mtime=0), "gzip-compressed"),
    ("docs.txt", gzip.compress(b"hello\n", mtime=0), "gzip-compressed"),  # the content decides, not only the name
    ("weights.dat", b"\x00\x01\x02binary", "binary"),
    ("latin1.txt", "café\n".encode("latin-1") * 3, "not UTF-8 text"),
    ("table.parquet", b"id,text\n1,hello\n", "not a Parquet file"),
    ("data.arrow", b"ARROW1\x00\x00", "an Arrow file"),
], ids=["gzip-jsonl", "gzip-as-txt", "binary", "latin1", "fake-parquet", "arrow"])
def test_a_file_gptjax_does_not_read_is_one_line_before_any_tokenizer_is_trained(tmp_path, monkeypatch, name,
                                                                                  content, what):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "fine.txt").write_text("plain text\n")
    (tmp_path / "in" / name).write_bytes(content)
    monkeypatch.setattr(tk_workdir, "train_sentencepiece", lambda *a, **k: pytest.fail("a tokenizer was trained"))
    with pytest.raises(UserError) as e:
        data.prepare(*typed_sections(_config(f"files:{tmp_path}/in/*")), RunDir.at(str(tmp_path / "run")),
                     process_index=0, process_count=1)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{tmp_path}/in/{name} is {what}")
    assert "files: reads UTF-8 text (.jsonl/.ndjson" in line and ".parquet" in line


# --- parquet ----------------------------------------------------------------------------------


def test_parquet_rows_give_the_token_cache_the_same_rows_give_as_jsonl(tmp_path, tok):
    rows = _rows()
    _write_jsonl(tmp_path / "j" / "docs.jsonl", rows)
    _write_parquet(tmp_path / "p" / "docs.parquet", rows)
    from_jsonl = _prepare(f"files:{tmp_path}/j/*", tmp_path / "run_j", tok)
    from_parquet = _prepare(f"files:{tmp_path}/p/*", tmp_path / "run_p", tok)
    assert _streams(from_parquet) == _streams(from_jsonl)
    assert from_parquet.val_tokens > 0 and from_parquet.train_tokens > from_parquet.val_tokens
    text = "".join(tok.decode(np.asarray(s.tokens)) for s in from_parquet.train + from_parquet.val)
    assert sorted(text.split(tk.EOT)[:-1]) == sorted(r for r in rows if r)

    # In a mixture, and with a column that is not there: one line naming the columns.
    mixed = _prepare(f"files:{tmp_path}/p/*@2 + files:{tmp_path}/j/*@1", tmp_path / "run_m", tok)
    assert _streams(mixed)[:1] == _streams(from_jsonl)[:1]
    with pytest.raises(UserError, match=r"docs.parquet has no column 'body' \(columns: \['id', 'text'\]\); set "
                                        r"data.text_field"):
        _prepare(f"files:{tmp_path}/p/*", tmp_path / "run_x", tok, text_field="body")


def test_parquet_in_a_bucket_is_read_as_on_disk(gcs_bucket, tmp_path, tok, monkeypatch):
    from etils import epath

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host"))
    rows = _rows(40, seed=3)
    _write_parquet(tmp_path / "p" / "docs.parquet", rows, row_group_size=5)
    epath.Path(f"gs://{gcs_bucket}/p/docs.parquet").write_bytes((tmp_path / "p" / "docs.parquet").read_bytes())
    local = _prepare(f"files:{tmp_path}/p/*.parquet", tmp_path / "run", tok)
    remote = _prepare(f"files:gs://{gcs_bucket}/p/*.parquet", f"gs://{gcs_bucket}/run", tok)
    assert _streams(remote) == _streams(local)


from gcs_emulator import gcs_bucket  # noqa: E402,F401  (a fixture)


# --- Hugging Face datasets --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> tuple[str, str, list[str], list[str]]:
    """A single dataset and a DatasetDict (train + test) saved with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    train, test = _rows(50, seed=4), _rows(12, seed=5)
    datasets.Dataset.from_dict({"content": train}).save_to_disk(str(root / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": train}),
                          "test": datasets.Dataset.from_dict({"content": test})}).save_to_disk(str(root / "dict"))
    return str(root / "single"), str(root / "dict"), train, test


def _docs(tok, streams) -> list[str]:
    return sorted("".join(tok.decode(np.asarray(s.tokens)) for s in streams).split(tk.EOT)[:-1])


def test_an_hf_dataset_saved_to_disk_is_read(tmp_path, tok, saved_dataset):
    single, dictionary, train, test = saved_dataset
    ds = _prepare(f"hf:{single}", tmp_path / "run1", tok, text_field="content")
    assert _docs(tok, ds.train + ds.val) == sorted(r for r in train if r) and ds.val_tokens > 0
    from gptjax.data import parallel, units

    with pytest.MonkeyPatch.context() as m:  # ranges of rows read by 2 worker processes: the same cache
        m.setattr(units, "UNIT_BYTES", 300)
        m.setattr(parallel, "POOL_MIN_UNITS", 2)
        again = _prepare(f"hf:{single}", tmp_path / "run2", tok, text_field="content", workers=2)
        source = data.sources.resolve(data.parse_source(f"hf:{single}")[0], data.DataConfig(text_field="content"))
        assert len(source.units) > 4
    assert _streams(again) == _streams(ds)

    # A named validation split is the validation stream; a row budget cuts the training split.
    ds = _prepare(f"hf:{dictionary}", tmp_path / "run3", tok, text_field="content", hf_val_split="test",
                  hf_max_docs=20)
    assert _docs(tok, ds.val) == sorted(r for r in test if r)
    assert _docs(tok, ds.train) == sorted(r for r in train[:20] if r)
    # A character budget stops the split once it is reached (read in order by one process).
    ds = _prepare(f"hf:{dictionary}", tmp_path / "run4", tok, text_field="content", hf_max_chars=200)
    kept = _docs(tok, ds.train + ds.val)
    assert 200 <= sum(map(len, kept)) < 200 + max(map(len, train)) and len(kept) < 20


@pytest.mark.parametrize("arg, fields, message", [
    ("{dict}", {"hf_split": "validation"}, "has no split 'validation'; splits: ['test', 'train']"),
    ("{dict}", {"text_field": "body"}, "has no column 'body' (columns: ['content'])"),
    ("{single}", {"hf_split": "test", "text_field": "content"}, "is a single dataset without splits"),
    ("a/b/c/d", {}, "expected hf:DIRECTORY (a dataset saved with save_to_disk), hf:ORG/NAME"),
])
def test_hf_mistakes_are_one_line(tmp_path, tok, saved_dataset, arg, fields, message):
    single, dictionary = saved_dataset[:2]
    with pytest.raises(UserError) as e:
        _prepare("hf:" + arg.format(dict=dictionary, single=single), tmp_path / "run", tok, **fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hf_without_the_datasets_package_is_one_line(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match=r"hf: sources need the `datasets` package: pip install 'gptjax\[hf\]'"):
        _prepare(f"hf:{tmp_path}/d", tmp_path / "run", tok)
