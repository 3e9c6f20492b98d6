"""Pretraining with a given tokenizer (tokenizer.path): a Hugging Face tokenizer.json such as
GPT-2's, or a SentencePiece model, used instead of training one; it sizes the model."""

from __future__ import annotations

import os
import random

import jax
import ml_collections
import numpy as np
import pytest

from gptjax import data
from gptjax import run as run_lib
from gptjax import tokenizer as tk
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.tokenizer import workdir as tk_workdir
from test_data import typed_sections

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _texts(n: int = 30) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(50)) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer.json, made as GPT-2's is (no download)."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=280, special_tokens=[tk.EOT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    path = os.path.join(tmp_path_factory.mktemp("gpt2"), "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_texts(12)):
        (root / f"d{i}.txt").write_text(text)
    return str(root)


def _config(source: str, path: str, **model) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": {"source": source, "val_fraction": 0.2, "workers": 1},
                                      "tokenizer": {"path": path, "vocab_size": 300}})


def test_a_given_tokenizer_json_is_used_and_saved_instead_of_training_one(tmp_path, gpt2_json, corpus, monkeypatch):
    monkeypatch.setattr(tk_workdir, "train_sentencepiece", lambda *a, **k: pytest.fail("a tokenizer was trained"))
    ds = data.prepare(*typed_sections(_config(f"files:{corpus}/*.txt", gpt2_json)), RunDir.at(str(tmp_path / "run")),
                      process_index=0, process_count=1)
    assert ds.tokenizer.kind == "gpt2" and ds.tokenizer.vocab_size == 280
    assert tk.load_tokenizer(str(tmp_path / "run" / "tokenizer")).fingerprint() == ds.tokenizer.fingerprint()
    text = "".join(ds.tokenizer.decode(np.asarray(s.tokens)) for s in ds.train + ds.val)
    assert sorted(text.split(tk.EOT)[:-1]) == sorted(_texts(12))

    # A workdir that holds another tokenizer is not silently mixed with this one.
    other = tk.train_sentencepiece(_texts(), str(tmp_path / "spm"), vocab_size=300)
    with pytest.raises(UserError, match="holds another tokenizer than tokenizer.path"):
        data.prepare(*typed_sections(_config(f"files:{corpus}/*.txt", str(tmp_path / "spm" / "tokenizer.model"))),
                     RunDir.at(str(tmp_path / "run")), process_index=0, process_count=1)
    # A SentencePiece model file works the same way.
    ds = data.prepare(*typed_sections(_config(f"files:{corpus}/*.txt", str(tmp_path / "spm" / "tokenizer.model"))),
                      RunDir.at(str(tmp_path / "run2")), process_index=0, process_count=1)
    assert ds.tokenizer.fingerprint() == other.fingerprint()


@pytest.mark.parametrize("name, message", [("missing.json", "does not exist; give a Hugging Face tokenizer.json"),
                                           ("vocab.txt", "unknown kind of file")])
def test_a_wrong_tokenizer_path_is_one_line(tmp_path, name, message):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match=message):
        tk.load_given(str(tmp_path / name))


def test_the_given_tokenizer_sizes_the_model_and_dry_run_names_it(tmp_path, gpt2_json):
    from gptjax.config import base_config

    config = base_config()
    config.model.update(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=0)
    config.train.update(batch_size=2, seq_len=16)
    config.tokenizer.path = gpt2_json
    r = run_lib.resolve(config, str(tmp_path / "run"), jax.devices()[:1])
    assert r.model.vocab_size == 280 and r.tokenizer.kind == "gpt2"
    assert r.tokenizer_note == f"tokenizer: GPT-2 byte-level BPE, 280 ids from {gpt2_json}; model vocabulary 280"
    config.tokenizer.path = str(tmp_path / "not-yet" / "tokenizer.json")  # the model's size is given: it may come later
    config.model.vocab_size = 280
    r = run_lib.resolve(config, None, jax.devices()[:1])
    assert r.tokenizer is None and "not there yet" in r.tokenizer_note


def test_a_gpt2_tokenizer_encodes_the_same_in_worker_processes(tmp_path, gpt2_json, corpus, monkeypatch):
    from gptjax.data import parallel, units

    monkeypatch.setattr(units, "UNIT_BYTES", 200)
    monkeypatch.setattr(parallel, "POOL_MIN_UNITS", 2)
    streams = []
    for workers in (1, 2):
        config = _config(f"files:{corpus}/*.txt", gpt2_json)
        config.data.workers = workers
        ds = data.prepare(*typed_sections(config), RunDir.at(str(tmp_path / f"run{workers}")), process_index=0,
                          process_count=1)
        streams.append([np.asarray(s.tokens).tobytes() for s in ds.train + ds.val])
    assert streams[0] == streams[1]  # forked after this process's encoder ran on all cores, one thread each
