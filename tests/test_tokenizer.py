"""Tokenizers: exact round trips on arbitrary Unicode, save/load, EOT handling, GPT-2 BPE files."""

from __future__ import annotations

import json
import os
import random

import pytest
import tokenizers

from gptjax import tokenizer as tk
from gptjax.errors import UserError

# Code points from many scripts and planes (no surrogates: they are not text).
_RANGES = [(0x00, 0x7F), (0x80, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
           (0x2000, 0x206F), (0x2500, 0x25FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
           (0xE000, 0xF8FF), (0xFE00, 0xFFFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]


def _random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice([" " * rng.randint(1, 9), "\n" * rng.randint(1, 3), "\t", "\r\n", "\u2581", "\x00"]))
        else:
            lo, hi = rng.choice(_RANGES)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n",
    "The quick brown fox jumps over the lazy dog. 1234567890\n" * 3,
    "Grüße aus Köln — naïve café, 東京タワー, Привет мир, 😀👍🏽\n",
    "    if x is None:\n        raise ValueError('x')\n\t\ttabs\there\n",
] * 40


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("spm"))
    tk.train_sentencepiece(CORPUS, d, vocab_size=400)
    return d


@pytest.fixture(scope="module")
def spm_tok(spm_dir: str) -> tk.SentencePieceTokenizer:
    return tk.load_tokenizer(spm_dir)


def test_sentencepiece_round_trips_arbitrary_unicode(spm_tok):
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randint(0, 200)) for _ in range(200)]
    texts += ["", " ", "  \n\n  \t", "\u2581", "a\u2581b \u2581\u2581", "\x00\x01\x1f\x7f", "\ufeffBOM", "e\u0301",
              "trailing   ", "   leading", "\r\n\r\n", "<|endoftext|>", "x" * 20000] + CORPUS[:4]
    for t, ids in zip(texts, spm_tok.encode_batch(texts)):
        assert ids == spm_tok.encode(t)
        assert spm_tok.decode(ids) == t
        assert all(0 <= i < spm_tok.vocab_size for i in ids)


def test_sentencepiece_eot_is_never_produced_from_text(spm_tok):
    ids = spm_tok.encode("a <|endoftext|> b" + tk.EOT)
    assert spm_tok.eot_id not in ids
    assert spm_tok.decode(spm_tok.encode("x") + [spm_tok.eot_id] + spm_tok.encode("y")) == "x<|endoftext|>y"


def test_ids_past_the_vocabulary_decode_to_nothing(spm_tok, tmp_path):
    _byte_level_bpe(str(tmp_path))
    for tok in (spm_tok, tk.GPT2BPETokenizer.from_files(str(tmp_path))):
        ids = tok.encode("hello")
        assert tok.decode(ids + [tok.vocab_size + 5] + ids) == "hellohello"


def test_sentencepiece_is_concatenative_and_learns_code_pieces(spm_tok):
    a, b = "def f(x):\n", "    return x\n"
    assert spm_tok.encode(a) + spm_tok.encode(b) == spm_tok.encode(a + b)
    assert len(spm_tok.encode(CORPUS[0])) < 0.7 * len(CORPUS[0].encode())


def test_sentencepiece_save_load_same_ids(spm_tok, spm_dir, tmp_path):
    spm_tok.save(str(tmp_path))
    again = tk.load_tokenizer(str(tmp_path))
    meta = json.load(open(os.path.join(spm_dir, tk.META_FILE)))
    assert meta["kind"] == "sentencepiece" and meta["vocab_size"] == 400 == again.vocab_size
    assert meta["eot_id"] == again.eot_id and again.model_type == "bpe"
    assert again.fingerprint() == spm_tok.fingerprint()
    text = CORPUS[2] + CORPUS[3]
    assert again.encode(text) == spm_tok.encode(text)


def test_sentencepiece_training_is_deterministic_and_unigram_works(spm_tok, tmp_path):
    assert tk.train_sentencepiece(CORPUS, str(tmp_path / "a"), 400).fingerprint() == spm_tok.fingerprint()
    uni = tk.train_sentencepiece([open(__file__).read()], str(tmp_path / "u"), 400, model_type="unigram")
    assert uni.model_type == "unigram" and uni.decode(uni.encode(CORPUS[2])) == CORPUS[2]


def test_sentencepiece_training_handles_long_lines_and_max_chars(tmp_path):
    rng = random.Random(0)
    long_line = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"]) for _ in range(20000))
    tok = tk.train_sentencepiece([long_line, "other words here\n"], str(tmp_path), 295, max_chars=50_000)
    assert tok.decode(tok.encode(long_line)) == long_line
    assert len(tok.encode(" alpha beta gamma delta")) <= 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=100), "vocab_size must be at least"),
    (dict(vocab_size=400, model_type="char"), "model_type must be one of"),
    (dict(vocab_size=100000), "Vocabulary size too high.*change tokenizer.vocab_size"),
])
def test_sentencepiece_bad_settings_raise_user_error(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        tk.train_sentencepiece(CORPUS[:4], str(tmp_path), **kwargs)


def test_sentencepiece_empty_corpus_raises(tmp_path):
    with pytest.raises(UserError, match="no text"):
        tk.train_sentencepiece(["", "\n\n"], str(tmp_path), 300)


def _byte_level_bpe(directory: str) -> tokenizers.Tokenizer:
    """A small GPT-2-style tokenizer trained here, saved as tokenizer.json and vocab.json+merges.txt."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=[tk.EOT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    tok.model.save(directory)
    return tok


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_gpt2_bpe_from_files_round_trips(tmp_path, layout):
    ref = _byte_level_bpe(str(tmp_path))
    if layout == "vocab+merges":
        os.remove(tmp_path / "tokenizer.json")
    else:
        os.remove(tmp_path / "vocab.json")
    tok = tk.GPT2BPETokenizer.from_files(str(tmp_path))
    assert tok.kind == "gpt2" and tok.vocab_size == ref.get_vocab_size() and tok.eot_id == ref.token_to_id(tk.EOT)
    rng = random.Random(1)
    texts = [_random_text(rng, 100) for _ in range(50)] + CORPUS[:4] + [" hello world", "<|endoftext|>"]
    for t, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(t) and tok.decode(ids) == t
        assert tok.eot_id not in ids
    assert tok.encode(" hello world") == ref.encode(" hello world").ids


def test_gpt2_bpe_save_load_and_transformers_reads_it(tmp_path):
    _byte_level_bpe(str(tmp_path / "src"))
    tok = tk.GPT2BPETokenizer.from_files(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    tok.save(out)
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
            tk.META_FILE} <= set(os.listdir(out))
    again = tk.load_tokenizer(out)
    assert isinstance(again, tk.GPT2BPETokenizer) and again.fingerprint() == tok.fingerprint()
    text = CORPUS[0] + CORPUS[2]
    assert again.encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.eos_token_id == tok.eot_id and len(hf) == tok.vocab_size
    assert hf.encode(text) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_load_tokenizer_rejects_a_non_tokenizer_directory(tmp_path):
    with pytest.raises(UserError, match="not a tokenizer directory"):
        tk.load_tokenizer(str(tmp_path))
    (tmp_path / tk.META_FILE).write_text('{"kind": "wordpiece"}')
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        tk.load_tokenizer(str(tmp_path))


def test_training_texts_take_each_sources_share_of_max_chars():
    a, b = ["a" * 10] * 100, ["b" * 10] * 100
    texts = list(tk.training_texts([(3.0, iter(a)), (1.0, iter(b))], max_chars=400))
    assert texts == a[:30] + b[:10]
    assert list(tk.training_texts([(1.0, iter(["x" * 25] * 9))], max_chars=60)) == ["x" * 25] * 3


def test_workdir_tokenizer_trains_once_then_loads(tmp_path):
    said, reads = [], []

    def texts():
        reads.append(1)
        yield from CORPUS

    settings = {"vocab_size": 400, "model_type": "bpe", "max_chars": 2000}
    directory = str(tmp_path / "run" / "tokenizer")
    tok = tk.workdir_tokenizer(directory, **settings, sources=[(1.0, texts())], say=said.append)
    assert tok.vocab_size == 400 and reads == [1] and os.listdir(tmp_path / "run") == ["tokenizer"]
    assert said[0].startswith("tokenizer: training SentencePiece bpe with 400 pieces on up to 2,000 characters")
    assert said[1].startswith("tokenizer: trained on 2,000 characters in ") and said[1].endswith(directory)
    again = tk.workdir_tokenizer(directory, **settings, sources=[(1.0, texts())], say=said.append)
    assert again.fingerprint() == tok.fingerprint() and reads == [1]  # the texts are not read
    assert said[2] == f"tokenizer: SentencePiece bpe, 400 pieces, loaded from {directory}"
    with pytest.raises(UserError, match="use a new workdir"):
        tk.workdir_tokenizer(directory, **{**settings, "vocab_size": 500}, sources=[(1.0, texts())], say=said.append)
