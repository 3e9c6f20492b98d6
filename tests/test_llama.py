"""Llama-format models in and out (`gptjax.hf.llama`) against transformers' LlamaForCausalLM on
PyTorch CPU: tiny random models made here, nothing downloaded."""

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
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptjax import checkpoint_read, hf  # noqa: E402
from gptjax import config as config_lib  # noqa: E402
from gptjax.errors import UserError  # noqa: E402
from gptjax.model import GPT, GPTConfig, init_params  # noqa: E402
from gptjax.run import resolve  # noqa: E402
from gptjax.sampling import generate_tokens  # noqa: E402
from gptjax.tokenizer import EOT, GPT2BPETokenizer, load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_hf  # noqa: E402
import tokenizers  # noqa: E402
from hf_fixtures import randomize, train_bpe  # noqa: E402

VOCAB = 300
# The shape of the tiny Hugging Face Llama below (`_save_hf_llama`), so that the export and import
# tests of the same options share compiled programs.
LLAMA = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, n_mlp=48, block_size=32, ln_eps=1e-5,
             position="rope", rope_base=50.0, norm="rmsnorm", mlp="swiglu", bias=False)
PROMPT = [5, 17, 250, 3, 99]


@pytest.fixture(scope="module")
def bpe() -> tokenizers.Tokenizer:
    """A byte-level BPE of VOCAB ids, '<|endoftext|>' the last."""
    return train_bpe(VOCAB)


def _random_params(fields: dict) -> dict:
    """Every parameter random (norm scales near 1), so that no mapping error hides behind zeros or
    ones; the tree from `init_params`'s shapes (not run: eager init is slow)."""
    shapes = jax.eval_shape(lambda: init_params(GPTConfig(**fields), jax.random.PRNGKey(0)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(1)
    out = [(1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
           for path, x in leaves]
    return jax.tree_util.tree_unflatten(tree, out)


@functools.lru_cache
def _jitted_apply(cfg: GPTConfig) -> Callable:
    return jax.jit(GPT(cfg).apply)


def _jax_logits(fields: dict, params: dict, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_jitted_apply(GPTConfig(**fields))({"params": params}, jnp.asarray(tokens)))


def _torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def _torch_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # as gptjax's stop_tokens=(): never stop early
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, LLAMA["block_size"]))


def _same_model(fields: dict, params: dict, model: torch.nn.Module, greedy: bool = True) -> None:
    """Logits within 1e-4 over the whole context, and (`greedy`) the same 8 greedy tokens from
    gptjax's KV-cache decoder as from transformers' `generate`."""
    tokens = _tokens()
    np.testing.assert_allclose(_jax_logits(fields, params, tokens), _torch_logits(model, tokens), atol=1e-4, rtol=0)
    if greedy:
        ours = generate_tokens(GPTConfig(**fields), params, [PROMPT], max_new_tokens=8, temperature=0.0, stop_tokens=())
        assert ours[0] == _torch_greedy(model, PROMPT, 8)


@pytest.mark.parametrize("n_kv_head,tie", [(1, True), (0, False)], ids=["mqa-tied", "mha-untied"])
def test_export_loads_as_llama_in_transformers(bpe, tmp_path, n_kv_head: int, tie: bool) -> None:
    fields = {**LLAMA, "n_kv_head": n_kv_head, "tie_embeddings": tie}
    params = _random_params(fields)
    tok = GPT2BPETokenizer(bpe)
    out = str(tmp_path / "llama")
    assert hf.export_hf_dir(fields, params, tok, out) == "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.rope_parameters["rope_theta"]) == (n_kv_head or 4, tie, 50.0)
    assert ("lm_head.weight" in load_file(os.path.join(out, "model.safetensors"))) == (not tie)
    _same_model(fields, params, model, greedy=tie)  # the import test's options: compiled once
    ref = transformers.AutoTokenizer.from_pretrained(out)
    assert ref("Hello, world!", add_special_tokens=False).input_ids == tok.encode("Hello, world!")
    assert ref.eos_token_id == tok.eot_id == cfg.eos_token_id
    # And back: the same fields and parameters.
    fields2, params2, tok2 = hf.load_hf_dir(out)
    assert fields2 == {**fields, "n_kv_head": n_kv_head or 4} and tok2.fingerprint() == tok.fingerprint()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def _save_hf_llama(directory: str, bpe: tokenizers.Tokenizer) -> torch.nn.Module:
    """A random tiny LlamaForCausalLM shaped by SmolLM-135M's rules (tied head, fewer key/value
    heads: here one) saved with its tokenizer, as transformers saves it (rope_parameters in config.json)."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 50.0},
        bos_token_id=bpe.token_to_id(EOT), eos_token_id=bpe.token_to_id(EOT),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.3 * noise)
    model.save_pretrained(directory, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT).save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_llama(bpe, tmp_path_factory) -> tuple[str, torch.nn.Module]:
    d = str(tmp_path_factory.mktemp("hf") / "llama-tiny")
    return d, _save_hf_llama(d, bpe)


def test_import_matches_transformers(hf_llama, bpe, tmp_path) -> None:
    d, model = hf_llama
    fields, params, tok = hf.load_hf_dir(d)
    assert fields == {**LLAMA, "n_kv_head": 1, "tie_embeddings": True}
    assert tok.eot_id == bpe.token_to_id(EOT)
    _same_model(fields, params, model)
    # init_from=hf:DIR tells Llama from config.json, and the run's own model options cannot override it.
    config = config_lib.base_config()
    config.init_from = f"hf:{d}"
    config.model.qk_norm = True
    config.train.seq_len = 32
    run = resolve(config, None, devices=jax.devices("cpu")[:1])
    assert (run.model.position, run.model.norm, run.model.mlp, run.model.kv_heads, run.model.qk_norm) == (
        "rope", "rmsnorm", "swiglu", 1, False)


@pytest.mark.parametrize("option,value", [
    ("qk_norm", True), ("mlp", "relu2"), ("mlp", "gelu"), ("logit_softcap", 30.0), ("bias", True),
    ("norm", "layernorm"), ("position", "learned"),
])
def test_export_refuses_what_llama_cannot_hold(bpe, option: str, value: object, tmp_path) -> None:
    fields = {**LLAMA, option: value}
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        hf.export_hf_dir(fields, {}, GPT2BPETokenizer(bpe), str(out))
    msg = str(e.value)
    assert "\n" not in msg and f"model.{option}={value!r}" in msg and "Llama cannot hold" in msg, msg
    assert not out.exists()


def test_export_refuses_a_gpt2_model_with_an_option_gpt2_cannot_hold(bpe, tmp_path) -> None:
    fields = {"vocab_size": VOCAB, "n_layer": 1, "n_head": 2, "n_embd": 32, "qk_norm": True}
    with pytest.raises(UserError, match=r"GPT-2 cannot hold model.qk_norm=True \(GPT-2 has no QK-norm\); Llama cannot "
                                        r"hold model.position='learned'") as e:
        hf.export_hf_dir(fields, {}, GPT2BPETokenizer(bpe), str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert hf.export_format({**fields, "qk_norm": False}) == "gpt2"


def test_cli_round_trip_and_bad_input(hf_llama, tmp_path, capsys: pytest.CaptureFixture) -> None:
    """import writes a gptjax run of the Llama directory; export gives back the same model; a
    directory without weights is one line and exit status 2."""
    d, model = hf_llama
    workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
    convert_hf.main(["import", "--hf_dir", d, "--out", workdir])
    config, _ = checkpoint_read.load_for_inference(workdir)
    assert (config.model.position, config.model.n_kv_head) == ("rope", 1)
    convert_hf.main(["export", "--workdir", workdir, "--out", out])
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {out}: LlamaForCausalLM, ")
    exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    np.testing.assert_array_equal(_torch_logits(exported, tokens), _torch_logits(model, tokens))
    capsys.readouterr()  # transformers' progress bars
    no_weights = str(tmp_path / "no_weights")
    shutil.copytree(d, no_weights, ignore=lambda _d, names: [n for n in names if n == "model.safetensors"])
    cases = ((no_weights, "has no model.safetensors"), (str(tmp_path / "nowhere"), "nowhere does not exist"),
             (str(tmp_path), "has no config.json"))
    for broken, message in cases:
        with pytest.raises(SystemExit) as exc:
            convert_hf.main(["import", "--hf_dir", broken, "--out", str(tmp_path / "run2")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_import_refuses_what_gptjax_does_not_compute(hf_llama, tmp_path) -> None:
    d, _ = hf_llama
    cases = {
        "rope_scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
        "bias": ({"attention_bias": True}, "attention_bias=True is not supported"),
        "act": ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        "head_dim": ({"head_dim": 16}, "head_dim=16 is not supported"),
        "kv": ({"num_key_value_heads": 3}, "n_kv_head=3 must divide"),
        "mistral": ({"model_type": "mistral"}, "only 'gpt2' and 'llama'"),
    }
    for name, (change, message) in cases.items():
        case = shutil.copytree(d, str(tmp_path / name))
        with open(os.path.join(case, "config.json")) as f:
            cfg = json.load(f)
        cfg.pop("rope_parameters", None)  # transformers 5 writes it; older configs have rope_theta + rope_scaling
        with open(os.path.join(case, "config.json"), "w") as f:
            json.dump({**cfg, **change}, f)
        with pytest.raises(UserError, match=message) as e:
            hf.load_hf_dir(case)
        assert "\n" not in str(e.value)


def test_a_tokenizer_without_endoftext_ends_texts_with_its_eos(tmp_path) -> None:
    """A Llama-style vocabulary ('<unk>', '<s>', '</s>', no '<|endoftext|>') keeps its size, and
    '</s>' (tokenizer_config.json's eos_token) is the end-of-text id, also after gptjax saves it."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    src = str(tmp_path / "llama-tok")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(src)
    ours = load_tokenizer(src)
    assert (ours.eot_id, ours.vocab_size) == (2, tok.get_vocab_size())
    assert ours.decode(ours.encode("the lazy dog")) == "the lazy dog"
    assert ours.eot_id not in ours.encode("a </s> b")  # written in a document, '</s>' is text
    saved = str(tmp_path / "saved")
    ours.save(saved)
    again = load_tokenizer(saved)
    assert (again.eot_id, again.vocab_size, again.fingerprint()) == (2, ours.vocab_size, ours.fingerprint())
    assert transformers.AutoTokenizer.from_pretrained(saved).eos_token_id == 2


SMOLLM_135M = {  # HuggingFaceTB/SmolLM-135M's config.json as transformers 4.40 wrote it (the shape; no weights)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.02, "intermediate_size": 1536,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "4.40.0.dev0", "use_cache": True,
    "vocab_size": 49152,
}


def test_smollm_135m_config_reads_as_its_shape(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM_135M))
    cfg = GPTConfig(**hf.imported_fields(hf.read_hf_config(str(tmp_path))))
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.tie_embeddings) == (30, 9, 3, 64, 1536, True)
    assert cfg.num_params() == 134_515_008  # SmolLM-135M's parameter count
    layout = hf.llama.layout(cfg)
    assert len(layout) == 2 + 30 * 9 and layout["model.layers.0.self_attn.k_proj.weight"].hf_shape == (192, 576)
