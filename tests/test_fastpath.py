"""The platform's fast path and fewer HBM bytes per token (issue 22): `model.attention="auto"`
resolved per platform, the vocabulary padded to a multiple (same loss, gradients, samples and
Hugging Face export as the unpadded model), and the memory options against their reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import hf
from gptjax.errors import UserError
from gptjax.loss import cross_entropy, head_cross_entropy, head_eval_sums
from gptjax.model import GPT, GPTConfig, init_params
from gptjax.model.platform import resolve_attention, trace_platform

TINY = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=32, block_size=16)


# -- attention="auto" ------------------------------------------------------------------------

def test_auto_attention_resolves_per_platform():
    auto = dataclasses.replace(TINY, attention="auto")
    assert resolve_attention(auto, "tpu") == "splash"
    assert resolve_attention(auto, "gpu") == "dot_product"
    assert resolve_attention(auto, "cpu") == "xla"
    assert resolve_attention(auto) == "xla"  # traced here, on the CPU
    # only the reference has attention dropout; a named implementation is kept on every platform
    assert resolve_attention(dataclasses.replace(auto, dropout=0.1), "tpu") == "xla"
    assert resolve_attention(dataclasses.replace(TINY, attention="dot_product"), "tpu") == "dot_product"
    with pytest.raises(UserError, match="auto"):
        dataclasses.replace(TINY, attention="fastest")


def test_auto_attention_takes_splash_when_compiling_for_a_tpu_topology_from_a_cpu():
    """Under a mesh of a TPU slice's compile-only devices (as `python -m gptjax.aot` lowers the
    steps on a CPU), the traced platform is the TPU and the lowered pass holds the splash
    kernel (a TPU custom call); on the CPU the same config lowers to no kernel."""
    from gptjax import aot
    from gptjax.aot.topology import topology_devices

    if not aot.libtpu_installed():
        pytest.skip('libtpu is not installed (pip install -e ".[tpu]")')
    cfg = dataclasses.replace(TINY, attention="auto", dtype="bfloat16", block_size=128)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    forward = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))
    _, devices = topology_devices("v5e:1x1")
    mesh = jax.sharding.Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        assert trace_platform() == "tpu"
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        on_tpu = forward.lower(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params),
                               jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=rep)).as_text()
    assert "tpu_custom_call" in on_tpu
    assert "tpu_custom_call" not in forward.lower(params, tokens).as_text()


# -- the padded vocabulary -------------------------------------------------------------------

PADDED = dataclasses.replace(TINY, vocab_multiple=32)  # 97 -> 128 rows


@pytest.fixture(scope="module")
def padded_pair():
    """Unpadded parameters, and the same with 31 random (not zero) padded embedding rows."""
    params = init_params(TINY, jax.random.PRNGKey(0))
    extra = jax.random.normal(jax.random.PRNGKey(1), (PADDED.padded_vocab - TINY.vocab_size, TINY.n_embd))
    padded = {**params, "wte": {"embedding": jnp.concatenate([params["wte"]["embedding"], extra])}}
    return params, padded


def test_padded_vocab_shape_and_check():
    assert PADDED.padded_vocab == 128 and TINY.padded_vocab == 97
    assert GPTConfig(vocab_size=50257, vocab_multiple=128).padded_vocab == 50304
    assert PADDED.num_params() == TINY.num_params()  # MFU counts the real vocabulary
    with pytest.raises(UserError, match="vocab_multiple"):
        dataclasses.replace(TINY, vocab_multiple=0)
    assert jax.eval_shape(lambda: init_params(PADDED, jax.random.PRNGKey(0)))["wte"]["embedding"].shape == (128, 32)


def test_padded_vocab_gives_the_same_loss_and_gradients(padded_pair, monkeypatch):
    """The model's logits, the chunked head's loss (training: four sequence chunks; evaluation:
    one) and every gradient equal the unpadded model's; the padded rows get zero gradient."""
    from gptjax import loss as loss_lib

    monkeypatch.setattr(loss_lib, "LOGITS_CHUNK_BYTES", 2 * 4 * 128 * 4)
    params, padded = padded_pair
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 16)) < 0.8, jnp.float32)

    def loss(cfg: GPTConfig, p: dict) -> jax.Array:
        hidden = GPT(cfg).apply({"params": p}, tokens, return_hidden=True)
        s, n = head_cross_entropy(hidden, p["wte"]["embedding"], targets, weights, cfg.vocab_size)
        return s / n

    run = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    want_loss, want_grads = run(TINY, params)
    got_loss, got_grads = run(PADDED, padded)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    got_table = np.asarray(got_grads["wte"]["embedding"])
    assert np.all(got_table[97:] == 0)
    got_grads = {**got_grads, "wte": {"embedding": got_table[:97]}}
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree_util.tree_leaves(got_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # the full logits (sampling, parity) have the real vocabulary only; evaluation's sums agree
    logits = jax.jit(lambda p: GPT(PADDED).apply({"params": p}, tokens))(padded)
    assert logits.shape == (2, 16, 97)
    want_sum, _ = cross_entropy(jax.jit(lambda p: GPT(TINY).apply({"params": p}, tokens))(params), targets, weights)
    monkeypatch.setattr(loss_lib, "LOGITS_CHUNK_BYTES", 2**20)
    hidden = jax.jit(lambda p: GPT(PADDED).apply({"params": p}, tokens, return_hidden=True))(padded)
    got_sum, _ = head_eval_sums(hidden, padded["wte"]["embedding"], targets, weights, vocab_size=97)
    assert float(got_sum) == pytest.approx(float(want_sum), rel=1e-5)


def test_padded_vocab_samples_the_same_tokens(padded_pair):
    """Greedy and seeded sampling give the unpadded model's tokens: no padded id is ever drawn."""
    from gptjax.sampling.decoder import generate_tokens

    params, padded = padded_pair
    prompts = [[1, 2, 3], [5]]
    for controls in ({"temperature": 0.0}, {"temperature": 1.5, "top_p": 0.95, "seed": 7}):
        want = generate_tokens(TINY, params, prompts, max_new_tokens=6, **controls)
        got = generate_tokens(PADDED, padded, prompts, max_new_tokens=6, **controls)
        assert got == want, controls
        assert all(0 <= t < 97 for row in got for t in row)


def test_padded_vocab_exports_and_imports_hugging_face_tensors(padded_pair):
    """Export leaves the padded rows behind (the unpadded model's tensors and config.json);
    import pads the embedding with zero rows to the padded size."""
    params, padded = padded_pair
    fields, padded_fields = dataclasses.asdict(TINY), dataclasses.asdict(PADDED)
    want, got = hf.params_to_hf(params, fields), hf.params_to_hf(padded, padded_fields)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert hf.hf_config(padded_fields, eot_id=0) == hf.hf_config(fields, eot_id=0)
    host = jax.tree_util.tree_map(np.asarray, params)
    imported = hf.pad_vocab(host, PADDED)
    assert imported["wte"]["embedding"].shape == (128, 32)
    np.testing.assert_array_equal(imported["wte"]["embedding"][:97], host["wte"]["embedding"])
    assert not imported["wte"]["embedding"][97:].any()
    assert hf.pad_vocab(host, TINY) is host


# -- what the backward pass saves -----------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_give_the_reference_loss_and_gradients(scan_layers):
    """Every model.remat_policy gives the loss and gradients of the model without remat; "dots"
    recomputes no projection (its gradient's jaxpr has one matmul per layer more than no
    remat's: the einsum attention's scores, which it does not keep), "nothing" (= remat=True)
    recomputes them all."""
    base = dataclasses.replace(TINY, n_layer=2, scan_layers=scan_layers)
    params = init_params(base, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 16)), jnp.int32)

    def loss(cfg: GPTConfig, p: dict) -> jax.Array:
        s, n = cross_entropy(GPT(cfg).apply({"params": p}, tokens[:, :-1]), tokens[:, 1:], jnp.ones((2, 15)))
        return s / n

    def dots(cfg: GPTConfig) -> int:
        return str(jax.make_jaxpr(jax.grad(lambda p: loss(cfg, p)))(params)).count("dot_general")

    want_loss, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    assert base.saved == "everything" and dataclasses.replace(base, remat=True).saved == "nothing"
    for policy in ("dots",) if scan_layers else ("nothing", "dots", "everything"):
        cfg = dataclasses.replace(base, remat_policy=policy)
        got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(cfg, p)))(params)
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, want_grads)
    reference = dots(base)
    scores = 1 if scan_layers else base.n_layer  # a scan's body is in the jaxpr once
    assert dots(dataclasses.replace(base, remat_policy="dots")) == reference + scores
    assert dots(dataclasses.replace(base, remat=True)) > reference + scores
    with pytest.raises(UserError, match="remat_policy"):
        dataclasses.replace(base, remat_policy="some")
