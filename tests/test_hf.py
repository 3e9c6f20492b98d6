"""Hugging Face GPT-2 import/export against transformers on PyTorch CPU (tiny, random, local)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import tokenizers  # noqa: E402

from gptjax import checkpoint_read  # noqa: E402
from gptjax import hf  # noqa: E402
from gptjax.errors import UserError  # noqa: E402
from gptjax.model import GPT, GPTConfig, init_params  # noqa: E402
from gptjax.tokenizer import EOT, GPT2BPETokenizer, load_tokenizer, train_sentencepiece  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_hf  # noqa: E402
from hf_fixtures import LITERAL_EOT, TEXTS, build_hf_dir  # noqa: E402
from hf_fixtures import corpus as _corpus  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random GPT2LMHeadModel and its BPE tokenizer, saved by transformers."""
    return build_hf_dir(str(tmp_path_factory.mktemp("hf") / "gpt2-tiny"))


@pytest.fixture(scope="module")
def torch_model(hf_dir: str) -> torch.nn.Module:
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def _copy(src: str, dst: str, skip: tuple[str, ...] = ()) -> str:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in skip])
    return dst


def _torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


@functools.lru_cache
def _jitted_apply(cfg: GPTConfig) -> Callable:
    return jax.jit(GPT(cfg).apply)


def _jax_logits(fields: dict, params: dict, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted_apply(GPTConfig(**fields))({"params": params}, jnp.asarray(tokens)))


def _batches(vocab: int, block: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, (3, 17)), rng.integers(0, vocab, (2, block))]


def _official_layout(src: str, dst: str) -> str:
    """The hub's gpt2 layout: names without 'transformer.', attention mask buffers, an lm_head copy."""
    _copy(src, dst, skip=("model.safetensors",))
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    n_pos = tensors["wpe.weight"].shape[0]
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n_pos, n_pos), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _sharded_layout(src: str, dst: str) -> str:
    """Weights split over two files listed in model.safetensors.index.json, as large models are saved."""
    _copy(src, dst, skip=("model.safetensors",))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    weight_map = {name: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, name in enumerate(sorted(tensors))}
    for shard in set(weight_map.values()):
        save_file({k: tensors[k] for k, v in weight_map.items() if v == shard}, os.path.join(dst, shard), metadata={"format": "pt"})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst


@pytest.mark.parametrize("layout", ["save_pretrained", "official", "sharded"])
def test_import_logits_match_transformers(hf_dir: str, torch_model: torch.nn.Module, tmp_path, layout: str) -> None:
    make = {"save_pretrained": lambda src, _dst: src, "official": _official_layout, "sharded": _sharded_layout}[layout]
    d = make(hf_dir, str(tmp_path / layout))
    fields, params, tok = hf.load_hf_dir(d)
    assert fields == {"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 4, "n_embd": 64,
                      "n_mlp": 0, "block_size": 128, "ln_eps": 1e-5}
    shapes = jax.eval_shape(lambda: init_params(GPTConfig(**fields), jax.random.PRNGKey(0)))
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(lambda s: s.shape, shapes)
    for tokens in _batches(fields["vocab_size"], fields["block_size"]):
        np.testing.assert_allclose(_jax_logits(fields, params, tokens), _torch_logits(torch_model, tokens), atol=1e-4, rtol=0)


def test_tokenizer_matches_transformers(hf_dir: str, tmp_path) -> None:
    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    _, _, tok = hf.load_hf_dir(hf_dir)
    # The same merges read from vocab.json + merges.txt alone (the files older checkpoints have).
    legacy = _copy(hf_dir, str(tmp_path / "legacy"), skip=("tokenizer.json",))
    tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json")).model.save(legacy)
    tok_legacy = GPT2BPETokenizer.from_files(legacy)
    assert tok.kind == "gpt2" and tok.eot_id == ref.eos_token_id == tok.vocab_size - 1
    for text in TEXTS:
        ids = ref(text, add_special_tokens=False).input_ids
        assert tok.encode(text) == ids == tok_legacy.encode(text), text
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [ref(t, add_special_tokens=False).input_ids for t in TEXTS]
    ids = tok.encode("a") + [tok.eot_id] + tok.encode(" b")
    assert tok.decode(ids) == ref.decode(ids) == f"a{EOT} b"
    # '<|endoftext|>' written inside a document stays text in gptjax (only the data pipeline
    # inserts the id); transformers does the same with split_special_tokens=True, while its
    # default turns the literal into the end-of-text id.
    for text in LITERAL_EOT:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert tok.eot_id not in ids and tok.decode(ids) == text
        assert tok.eot_id in ref(text, add_special_tokens=False).input_ids


def test_export_reloads_in_transformers(hf_dir: str, torch_model: torch.nn.Module, tmp_path) -> None:
    fields, params, tok = hf.load_hf_dir(hf_dir)
    out = str(tmp_path / "export")
    hf.export_hf_dir(fields, params, tok, out)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    for tokens in _batches(fields["vocab_size"], fields["block_size"]):
        np.testing.assert_allclose(_torch_logits(model, tokens), _torch_logits(torch_model, tokens), atol=1e-5, rtol=0)
    ref = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert ref(text, add_special_tokens=False).input_ids == tok.encode(text), text
    assert ref.eos_token_id == tok.eot_id == model.config.eos_token_id
    fields2, params2, tok2 = hf.load_hf_dir(out)
    assert fields2 == fields and tok2.fingerprint() == tok.fingerprint()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(UserError, match="not an empty directory"):
        hf.export_hf_dir(fields, params, tok, out)


def test_export_sentencepiece_run(hf_dir: str, torch_model: torch.nn.Module, tmp_path) -> None:
    """Weights load in transformers; the SentencePiece model travels as gptjax reads it."""
    spm = train_sentencepiece(_corpus(), str(tmp_path / "spm"), vocab_size=320)
    fields, params, _ = hf.load_hf_dir(hf_dir)
    out = str(tmp_path / "export")
    hf.export_hf_dir(fields, params, spm, out)
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.asarray(spm.encode("def f(x):\n    return x ** 2"))[None]
    np.testing.assert_array_equal(_torch_logits(model, tokens), _torch_logits(torch_model, tokens))
    assert model.config.eos_token_id == spm.eot_id
    fields2, _, tok2 = hf.load_hf_dir(out)
    assert fields2 == fields and tok2.kind == "sentencepiece" and tok2.fingerprint() == spm.fingerprint()


def _edit_config(d: str, **changes: object) -> None:
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(d: str, drop: tuple[str, ...] = (), **add: np.ndarray) -> None:
    path = os.path.join(d, "model.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if k not in drop}
    save_file({**tensors, **add}, path, metadata={"format": "pt"})


def test_bad_directories(hf_dir: str, tmp_path) -> None:
    def case(name: str, skip: tuple[str, ...] = ()) -> str:
        return _copy(hf_dir, str(tmp_path / name), skip=skip)

    with pytest.raises(UserError, match="nowhere does not exist"):
        hf.load_hf_dir(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="config.json is not a directory"):
        hf.load_hf_dir(os.path.join(hf_dir, "config.json"))
    with pytest.raises(UserError, match="has no config.json"):
        hf.load_hf_dir(case("no_config", ("config.json",)))
    with pytest.raises(UserError, match="has no model.safetensors"):
        hf.load_hf_dir(case("no_weights", ("model.safetensors",)))
    with pytest.raises(UserError, match="not a tokenizer directory"):
        hf.load_hf_dir(case("no_tokenizer", ("tokenizer.json", "tokenizer_config.json")))
    pickled = case("pickled", ("model.safetensors",))
    with open(os.path.join(pickled, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not to be unpickled")
    with pytest.raises(UserError, match=r"pytorch_model.bin.*only safetensors.*safe_serialization=True"):
        hf.load_hf_dir(pickled)

    d = case("truncated")
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        hf.load_hf_dir(d)
    d = case("shape")
    _edit_config(d, n_positions=64)
    with pytest.raises(UserError, match=r"'wpe.weight' has shape \(128, 64\) but config.json implies \(64, 64\)"):
        hf.load_hf_dir(d)
    d = case("missing")
    _edit_tensors(d, drop=("transformer.h.1.mlp.c_fc.bias",))
    with pytest.raises(UserError, match=r"lacks 1 tensor.*'h.1.mlp.c_fc.bias' \(expected shape \(256\)\)"):
        hf.load_hf_dir(d)
    d = case("extra")
    _edit_tensors(d, **{"transformer.h.2.ln_1.weight": np.ones(64, np.float32)})
    with pytest.raises(UserError, match=r"does not imply: \['h.2.ln_1.weight'\]"):
        hf.load_hf_dir(d)
    d = case("untied")
    _edit_tensors(d, **{"lm_head.weight": np.zeros((700, 64), np.float32)})
    with pytest.raises(UserError, match="lm_head.weight differs from wte.weight"):
        hf.load_hf_dir(d)
    d = case("relu")
    _edit_config(d, activation_function="relu")
    with pytest.raises(UserError, match="activation_function 'relu' is not supported"):
        hf.load_hf_dir(d)
    d = case("heads")
    _edit_config(d, n_head=5)
    with pytest.raises(UserError, match="n_head=5 must divide"):
        hf.load_hf_dir(d)
    d = case("neo")
    _edit_config(d, model_type="gpt_neo")
    with pytest.raises(UserError, match="only 'gpt2'"):
        hf.load_hf_dir(d)
    d = case("small_vocab")
    _edit_config(d, vocab_size=300)
    with pytest.raises(UserError, match="tokenizer has 700 tokens but config.json's vocab_size is 300"):
        hf.load_hf_dir(d)


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys: pytest.CaptureFixture) -> None:
    os.makedirs(tmp_path / "pickled")
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    for argv in (
        ["import", "--hf_dir", str(tmp_path / "pickled"), "--out", str(tmp_path / "run")],
        ["export", "--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path / "out")],
    ):
        with pytest.raises(SystemExit) as exc:
            convert_hf.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_import_then_export(hf_dir: str, torch_model: torch.nn.Module, tmp_path, capsys: pytest.CaptureFixture) -> None:
    fields, params, tok = hf.load_hf_dir(hf_dir)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf_out")
    convert_hf.main(["import", "--hf_dir", hf_dir, "--out", workdir])
    config, restored = checkpoint_read.load_for_inference(workdir)
    assert {k: config.model[k] for k in fields} == fields and config.init_from == f"hf:{hf_dir}"
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    assert load_tokenizer(os.path.join(workdir, "tokenizer")).fingerprint() == tok.fingerprint()
    convert_hf.main(["export", "--workdir", os.path.join(workdir, "checkpoints", "0"), "--out", out])
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {out}: ")
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.asarray([tok.encode(TEXTS[0])])
    np.testing.assert_array_equal(_torch_logits(model, tokens), _torch_logits(torch_model, tokens))
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXTS[3]).input_ids == tok.encode(TEXTS[3])
    with pytest.raises(SystemExit) as exc:
        convert_hf.main(["import", "--hf_dir", hf_dir, "--out", workdir])
    assert exc.value.code == 2 and "not an empty directory" in capsys.readouterr().err


def test_a_run_reads_its_imports_config_json_once(hf_dir: str, tmp_path, monkeypatch) -> None:
    """init_from=hf:DIR: resolve reads config.json (the model's shape and format), and the
    prepare stage reads the weights and tokenizer of what resolve read, not config.json again."""
    from gptjax import config as config_lib
    from gptjax.prepare import prepare
    from gptjax.run import resolve

    read = hf.read_json
    reads = []
    monkeypatch.setattr(hf, "read_json", lambda path, what: reads.append(os.path.basename(path)) or read(path, what))
    config = config_lib.base_config()
    config.init_from = f"hf:{hf_dir}"
    config.train.seq_len = 64
    r = resolve(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert reads == ["config.json"] and r.imported.fields["n_layer"] == 2
    r = prepare(r, data=False)
    assert reads == ["config.json"]
    want = hf.pad_vocab(hf.load_hf_dir(hf_dir)[1], r.model)  # the weights, read by themselves
    assert jax.tree_util.tree_structure(r.pretrained) == jax.tree_util.tree_structure(want)
    for got, expected in zip(jax.tree_util.tree_leaves(r.pretrained), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(got, expected)
