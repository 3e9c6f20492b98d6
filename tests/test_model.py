"""The GPT module: causality, the KV-cache path, shapes and parameter names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, init_params, matmul, to_decode_layout

CFG = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=48)


def jitted(model):
    """`model.apply`, compiled as one program per call signature (as training and sampling run
    the model) rather than dispatched op by op, which costs far more compiles on the CPU."""
    return jax.jit(model.apply, static_argnames=("decode", "mutable"))


@pytest.fixture(scope="module")
def params():
    # Compiled once rather than op by op (the tests need random parameters, not these exact values).
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))


def test_future_tokens_do_not_change_earlier_logits(params):
    apply = jitted(GPT(CFG))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, CFG.vocab_size)
    changed = tokens.at[:, 15].set((tokens[:, 15] + 1) % CFG.vocab_size)
    a = apply({"params": params}, tokens)
    b = apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :15]), np.asarray(b[:, :15]))
    assert np.abs(np.asarray(a[:, 15:] - b[:, 15:])).max() > 1e-4  # and later ones do change


def test_cache_prefill_and_decode_match_full_forward(params):
    model = GPT(CFG)
    apply = jitted(model)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 20), 0, CFG.vocab_size)
    full = apply({"params": params}, tokens)
    cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((3, 20), jnp.int32), decode=True))["cache"]
    cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), cache)
    logits, v = apply({"params": params, "cache": cache}, tokens[:, :12], decode=True, mutable=("cache",))
    np.testing.assert_allclose(logits, full[:, :12], atol=1e-5)
    cache = v["cache"]
    for i in range(12, 20):
        pos = jnp.full((3, 1), i, jnp.int32)
        step, v = apply({"params": params, "cache": cache}, tokens[:, i : i + 1], pos, decode=True, mutable=("cache",))
        cache = v["cache"]
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)


def test_padding_mask_hides_padded_keys(params):
    """A left-padded row with shifted positions gives the logits of the unpadded row."""
    apply = jitted(GPT(CFG))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 10), 0, CFG.vocab_size)
    alone = apply({"params": params}, tokens)
    padded = jnp.concatenate([jnp.full((1, 5), 7, jnp.int32), tokens], axis=1)
    mask = jnp.arange(15)[None] >= 5
    positions = jnp.maximum(jnp.arange(15)[None] - 5, 0)
    out = apply({"params": params}, padded, positions, mask)
    np.testing.assert_allclose(out[:, 5:], alone, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_layout_computes_the_same_logits(params, dtype):
    """GPT(decode_layout=True) over `to_decode_layout` params gives the standard model's logits,
    in a full forward pass and through the cache (prefill, then single-token steps)."""
    cfg = GPTConfig(**{**CFG.__dict__, "dtype": dtype})
    std, dec = GPT(cfg), GPT(cfg, decode_layout=True)
    std_apply, dec_apply = jitted(std), jitted(dec)
    dparams = to_decode_layout(cfg, params)
    assert dparams["h_0"]["attn"]["c_attn"]["kernel_out_in"].shape == (3 * 32, 32)
    assert dparams["h_0"]["attn"]["c_proj"]["kernel_out_in"].shape == (32, 32)
    assert dparams["h_1"]["mlp"]["c_fc"]["kernel_out_in"].shape == (128, 32)
    tol = 1e-5 if dtype == "float32" else 0.05
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 12), 0, CFG.vocab_size)
    full = std_apply({"params": params}, tokens)
    np.testing.assert_allclose(dec_apply({"params": dparams}, tokens), full, atol=tol)
    cache = jax.eval_shape(lambda: std.init(jax.random.PRNGKey(0), jnp.zeros((2, 12), jnp.int32), decode=True))["cache"]
    cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), cache)
    logits, v = dec_apply({"params": dparams, "cache": cache}, tokens[:, :8], decode=True, mutable=("cache",))
    np.testing.assert_allclose(logits, full[:, :8], atol=tol)
    for i in range(8, 12):
        pos = jnp.full((2, 1), i, jnp.int32)
        step, v = dec_apply({"params": dparams, "cache": v["cache"]}, tokens[:, i : i + 1], pos, decode=True, mutable=("cache",))
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=tol)


def test_decode_layout_refuses_the_standard_parameters(params):
    """No silent fallback: the two layouts name their kernels differently, even when square."""
    square = GPTConfig(**{**CFG.__dict__, "n_mlp": CFG.n_embd})
    sq_params = jax.jit(init_params, static_argnums=0)(square, jax.random.PRNGKey(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    for cfg, p in ((CFG, params), (square, sq_params)):
        # Traced only (eval_shape): the parameter lookup fails while tracing, before any compile.
        with pytest.raises(Exception, match="kernel_out_in"):
            jax.eval_shape(GPT(cfg, decode_layout=True).apply, {"params": p}, tokens)
        with pytest.raises(Exception, match="kernel"):
            jax.eval_shape(GPT(cfg).apply, {"params": to_decode_layout(cfg, p)}, tokens)
    with pytest.raises(KeyError):
        to_decode_layout(CFG, {"wte": params["wte"]})


def test_parameter_names_shapes_and_count(params):
    assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
    assert params["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 3, 4, 8)
    assert params["h_0"]["attn"]["c_proj"]["kernel"].shape == (4, 8, 32)
    assert params["h_1"]["mlp"]["c_fc"]["kernel"].shape == (32, 128)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == CFG.num_params()
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_every_parameter_has_logical_axis_names():
    boxed = jax.eval_shape(GPT(CFG).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in leaves)


def test_bf16_compute_keeps_fp32_params_and_close_logits(params):
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, CFG.vocab_size)
    fp32 = jitted(GPT(CFG))({"params": params}, tokens)
    bf16 = jitted(GPT(GPTConfig(**{**CFG.__dict__, "dtype": "bfloat16"})))({"params": params}, tokens)
    assert bf16.dtype == jnp.float32
    assert np.abs(np.asarray(fp32 - bf16)).max() < 0.1


def test_remat_gives_the_same_gradients(params):
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, CFG.vocab_size)
    loss = lambda m: lambda p: m.apply({"params": p}, tokens).mean()
    g1 = jax.jit(jax.grad(loss(GPT(CFG))))(params)
    g2 = jax.jit(jax.grad(loss(GPT(GPTConfig(**{**CFG.__dict__, "remat": True})))))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_head=5, n_embd=32), "must divide model.n_embd"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dtype="float64"), "model.dtype must be one of"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_bad_shapes_are_user_errors(fields, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**{**dict(vocab_size=10, n_layer=1, n_head=4, n_embd=32, block_size=8), **fields})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_and_mixed_precision_form(dtype):
    """`matmul`'s gradients match fp32 autodiff's (exactly in fp32; to bf16 precision through
    the custom rule in bf16), and every matmul of the forward and backward pass reads
    operands of the compute dtype and accumulates in fp32."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4)).astype(dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 6)).astype(dtype)
    eq = "bthd,dhc->btc"
    f = lambda a, b: (matmul(eq, a, b) ** 2).sum()
    ref = lambda a, b: (jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32)) ** 2).sum()
    got, want = jax.grad(f, argnums=(0, 1))(x, w), jax.grad(ref, argnums=(0, 1))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 0.1
    for g, r in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), rtol=tol, atol=tol)
    dots = _equations(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w).jaxpr, "dot_general")
    assert len(dots) == 3  # forward, d(x), d(w)
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [dtype, dtype]
        assert e.outvars[0].aval.dtype == jnp.float32


def _equations(jaxpr, primitive):
    """Every equation of `primitive` in a jaxpr, nested ones (pjit, custom_vjp) included."""
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == primitive:
            found.append(e)
        for p in e.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                found += _equations(getattr(inner, "jaxpr", inner), primitive)
    return found
