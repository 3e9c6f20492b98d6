"""The architecture options of `GPTConfig` (positions, norms, MLPs, key/value heads, head, bias,
init, soft-capping): against transformers' Llama, the KV-cache decoder against the full forward
pass, scan_layers / remat / packed rows against the plain model, and the mesh.

Two configurations together use every option's non-default value (the defaults are GPT-2's,
which tests/test_model.py and its neighbours cover):
  LLAMA   rope, rmsnorm, qk_norm, swiglu, 2 of 4 kv heads, untied head, no bias
  NANO    rope, relu2, multi-query (1 kv head, with biases), soft-capped logits, zero-initialised
          projections
Parameters are redrawn at random (`randomize`) so that zero-initialised projections, unit norm
scales and zero biases do not hide a wrong computation.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import sampling, sharding
from gptjax.errors import UserError
from gptjax.loss import cross_entropy, head_cross_entropy
from gptjax.model import GPT, GPTConfig, init_params, to_decode_layout
from gptjax.model.layers import head_table, soft_cap

TINY = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=16)
LLAMA = GPTConfig(**TINY, position="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_mlp=48, n_kv_head=2,
                  tie_embeddings=False, bias=False)
NANO = GPTConfig(**TINY, position="rope", mlp="relu2", n_kv_head=1, logit_softcap=3.0, zero_init_proj=True)
CONFIGS = {"llama": LLAMA, "nano": NANO}
_init = jax.jit(init_params, static_argnums=0)


def randomize(params, seed=1, std=0.3):
    """Every leaf redrawn from normal(0, std) (norm scales around 1)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        noise = std * jax.random.normal(k, x.shape, x.dtype)
        out.append(1.0 + noise if "scale" in jax.tree_util.keystr(path) else noise)
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture(scope="module")
def models():
    return {name: (cfg, jax.jit(randomize)(_init(cfg, jax.random.PRNGKey(0)))) for name, cfg in CONFIGS.items()}


_forward = jax.jit(
    lambda cfg, p, tokens, positions=None, segment_ids=None: GPT(cfg).apply(
        {"params": p}, tokens, positions, segment_ids=segment_ids
    ),
    static_argnums=0,
)


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (b, t)), jnp.int32)


PACKED = jnp.concatenate([tokens(1, 5, seed=1), tokens(1, 7, seed=2)], axis=1)  # two examples in one row
SEGMENTS = jnp.asarray([[0] * 5 + [1] * 7])
POSITIONS = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)  # each example's own positions


_loss_and_grads = jax.jit(
    jax.value_and_grad(
        lambda p, cfg: GPT(cfg).apply({"params": p}, PACKED, POSITIONS, segment_ids=SEGMENTS).sum()
    ),
    static_argnums=1,
)


# ------------------------------------------------------------------------ parameter trees


def test_defaults_are_gpt2_and_options_make_the_documented_tree():
    assert GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024).num_params() == 124_439_808
    p = jax.eval_shape(lambda: init_params(LLAMA, jax.random.PRNGKey(0)))
    assert set(p) == {"wte", "lm_head", "ln_f", "h_0", "h_1"}  # no wpe; an untied head
    assert p["lm_head"]["kernel"].shape == (64, 32) and set(p["ln_f"]) == {"scale"}
    attn, mlp = p["h_0"]["attn"], p["h_0"]["mlp"]
    assert {k: v["kernel"].shape for k, v in attn.items() if "kernel" in v} == {
        "q_proj": (32, 4, 8), "kv_proj": (32, 2, 2, 8), "c_proj": (4, 8, 32)
    }
    assert attn["ln_q"]["scale"].shape == attn["ln_k"]["scale"].shape == (8,)
    assert {k: v["kernel"].shape for k, v in mlp.items()} == {"gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    assert not any("bias" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(p)[0])
    for cfg in (*CONFIGS.values(), GPTConfig(**TINY, mlp="swiglu")):
        leaves = jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
        assert sum(x.size for x in leaves) == cfg.num_params()
    assert GPTConfig(**{**TINY, "n_embd": 768, "n_head": 12}, mlp="swiglu").mlp_dim == 2048  # Llama's 8/3, to 256


def test_zero_init_projections_start_at_zero():
    p = _init(NANO, jax.random.PRNGKey(0))
    assert not np.any(p["h_0"]["attn"]["c_proj"]["kernel"]) and not np.any(p["h_1"]["mlp"]["c_proj"]["kernel"])
    assert np.any(p["h_0"]["mlp"]["c_fc"]["kernel"])


@pytest.mark.parametrize("bad, message", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide"),
    (dict(position="alibi"), "model.position must be one of"),
    (dict(mlp="geglu"), "model.mlp must be one of"),
    (dict(norm="batch"), "model.norm must be one of"),
    (dict(position="rope", n_embd=36, n_head=4), "even head_dim"),
    (dict(logit_softcap=-1.0), "logit_softcap must be >= 0"),
])
def test_bad_options_are_one_line_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**{**TINY, **bad})


# ------------------------------------------------------------------------ transformers' Llama


def llama_to_gptjax(cfg, state):
    """gptjax parameters from a LlamaForCausalLM state dict (the tree of the options' docs, mapped here by hand)."""
    w = {k: v.detach().numpy() for k, v in state.items()}
    c, h, kv, d = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim
    out = {"wte": {"embedding": w["model.embed_tokens.weight"]}, "ln_f": {"scale": w["model.norm.weight"]},
           "lm_head": {"kernel": w["lm_head.weight"]}}
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        q, k, v = (w[pre + f"self_attn.{n}_proj.weight"].T.reshape(c, -1, d) for n in "qkv")
        attn = {"c_proj": {"kernel": w[pre + "self_attn.o_proj.weight"].T.reshape(h, d, c)}}
        if kv == h:
            attn["c_attn"] = {"kernel": np.stack([q, k, v], axis=1)}
        else:
            attn["q_proj"] = {"kernel": q}
            attn["kv_proj"] = {"kernel": np.stack([k, v], axis=1)}
        mlp = {n: {"kernel": w[pre + f"mlp.{n}.weight"].T} for n in ("gate_proj", "up_proj", "down_proj")}
        out[f"h_{i}"] = {"ln_1": {"scale": w[pre + "input_layernorm.weight"]},
                         "ln_2": {"scale": w[pre + "post_attention_layernorm.weight"]}, "attn": attn, "mlp": mlp}
    return jax.tree_util.tree_map(jnp.asarray, out)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_rope_and_grouped_query_attention_match_transformers_llama(n_kv_head):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(**{**TINY, "block_size": 32}, position="rope", rope_base=500.0, norm="rmsnorm", mlp="swiglu",
                    n_mlp=48, n_kv_head=n_kv_head, tie_embeddings=False, bias=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=0.2,
        attn_implementation="eager",
    )).eval()
    for name, p in hf.named_parameters():  # norm scales away from 1
        if "norm" in name:
            p.data = 1.0 + 0.3 * torch.randn_like(p)
    params = llama_to_gptjax(cfg, hf.state_dict())
    ids = np.random.default_rng(0).integers(0, 64, (2, 12))
    positions = np.stack([np.arange(12), np.arange(12) + 7])  # per-row positions: RoPE reads them
    with torch.no_grad():
        want = hf(torch.tensor(ids), position_ids=torch.tensor(positions)).logits.numpy()
    got = _forward(cfg, params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32))
    assert np.abs(want).max() > 0.5  # logits big enough that 1e-5 means something
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ attention implementations


def test_grouped_query_attention_is_the_same_in_every_implementation(models):
    """xla (grouped einsums), dot_product (jax's native GQA) and splash (kv heads repeated):
    a batch with a packed row, rotary positions per example; dot_product's gradients too."""
    cfg, params = models["llama"]
    t = 12
    ids = jnp.concatenate([PACKED, tokens(1, t)])
    segments = jnp.concatenate([SEGMENTS, jnp.zeros((1, t), jnp.int32)])
    positions = jnp.concatenate([POSITIONS, jnp.arange(t, dtype=jnp.int32)[None]])
    outs = {}
    for impl in ("xla", "dot_product", "splash"):
        c = dataclasses.replace(cfg, attention=impl)
        outs[impl] = np.asarray(_forward(c, params, ids, positions, segments))
    np.testing.assert_allclose(outs["dot_product"], outs["xla"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(outs["splash"], outs["xla"], atol=2e-5, rtol=0)
    (l0, g0), (l1, g1) = (_loss_and_grads(params, dataclasses.replace(cfg, attention=a)) for a in ("xla", "dot_product"))
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_equals_the_full_forward(models, name):
    """Prefill 5 tokens, then 7 single-token steps, in the decode layout over a cache that holds
    only the kv heads: every step's logits are the full pass's at that position."""
    cfg, params = models[name]
    ids = tokens(2, 12, seed=3)
    want = np.asarray(_forward(cfg, params, ids))
    model = GPT(cfg, decode_layout=True)
    dparams = to_decode_layout(cfg, params)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 12), jnp.int32), decode=True))
    cache = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes["cache"])
    assert cache["h_0"]["attn"]["cached_key"].shape == (2 * cfg.kv_heads, 12, cfg.head_dim)  # only the kv heads

    @jax.jit
    def step(cache, x, pos):
        logits, v = model.apply({"params": dparams, "cache": cache}, x, pos, decode=True, mutable=["cache"])
        return logits, v["cache"]

    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    logits, cache = step(cache, ids[:, :5], pos[:, :5])
    got = [logits]
    for i in range(5, 12):
        logits, cache = step(cache, ids[:, i : i + 1], pos[:, i : i + 1])
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=2e-5, rtol=0)


def test_decoding_past_the_window_equals_the_full_forward_over_the_cropped_context(models):
    """The sampler past block_size with RoPE (and grouped-query attention, an untied head): its
    greedy tokens are those of the full forward pass over the context the cropping rule gives
    (the row's newest tokens at positions 0..c-1)."""
    cfg, params = models["llama"]
    window, keep = cfg.block_size, sampling.keep_length(cfg.block_size)
    prompts = [list(np.asarray(tokens(1, 9, seed=5))[0]), [7, 3]]
    got = sampling.generate_tokens(cfg, params, prompts, max_new_tokens=3 * window, temperature=0)
    seqs, lengths = [list(p) for p in prompts], [len(p) for p in prompts]
    for _ in range(3 * window):
        padded = np.zeros((len(seqs), window), np.int32)
        for i, (seq, c) in enumerate(zip(seqs, lengths)):
            padded[i, :c] = seq[-c:]
        logits = np.asarray(_forward(cfg, params, jnp.asarray(padded)))
        for i, c in enumerate(lengths):
            seqs[i].append(int(np.argmax(logits[i, c - 1])))
            lengths[i] = c + 1 if c + 1 <= window else keep
    assert got == [s[len(p):] for s, p in zip(seqs, prompts)]


# ------------------------------------------------------------------------ scan, remat, packing


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_packed_row_gives_each_example_its_own_logits(models, name):
    cfg, params = models[name]
    got = np.asarray(_forward(cfg, params, PACKED, POSITIONS, SEGMENTS))
    # Each example alone, right-padded to the row (causal: the padding changes nothing before it).
    alone = np.asarray(_forward(cfg, params, jnp.concatenate([PACKED, jnp.roll(PACKED, -5, axis=1)])))
    np.testing.assert_allclose(got[0], np.concatenate([alone[0, :5], alone[1, :7]]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name, variant", [
    ("llama", dict(remat=True)), ("llama", dict(scan_layers=True, remat=True)), ("nano", dict(scan_layers=True)),
])
def test_remat_and_scan_layers_give_the_plain_loss_and_gradients(models, name, variant):
    """Over a packed row with segment ids and per-example positions."""
    cfg, params = models[name]
    (l0, g0), (l1, g1) = (_loss_and_grads(params, c) for c in (cfg, dataclasses.replace(cfg, **variant)))
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ head and loss


def test_soft_capped_chunked_loss_and_gradient_equal_autodiff(models):
    cfg, params = models["nano"]
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
    table = head_table(cfg, params)
    targets, weights = tokens(2, 6, seed=4), jnp.ones((2, 6))

    def reference(h, w):
        return cross_entropy(soft_cap(jnp.einsum("btc,vc->btv", h, w), cfg.logit_softcap), targets, weights)[0]

    def chunked(h, w):
        return head_cross_entropy(h, w, targets, weights, softcap=cfg.logit_softcap)[0]

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, table) for f in (reference, chunked))
    assert not np.isclose(l0, head_cross_entropy(hidden, table, targets, weights)[0])  # the cap matters
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for x, y in zip(g1, g0):
        np.testing.assert_allclose(x, y, atol=1e-5)
    logits = _forward(cfg, params, tokens(2, 12))
    assert float(jnp.abs(logits).max()) < cfg.logit_softcap


# ------------------------------------------------------------------------ mesh


def test_every_option_shards_over_a_tensor_and_fsdp_mesh(models):
    """The boxed parameters' logical names map onto a (1, 2, 2) mesh (multi-query's single kv
    head too), and the sharded forward pass gives the single-device logits."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    shardings = {}
    for name, (cfg, _) in models.items():
        boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
        shardings[name] = sharding.logical_shardings(mesh, boxed)
        attn = shardings[name]["h_0"]["attn"]
        assert attn["q_proj"]["kernel"].spec == P("fsdp", "tensor", None)
        assert attn["kv_proj"]["kernel"].spec == P("fsdp", None, None, None)  # the kv heads stay whole
    cfg, params = models["nano"]  # multi-query: one kv head on a tensor axis of 2
    placed = jax.device_put(params, shardings["nano"])
    ids = tokens(2, 8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        got = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))(placed, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_forward(cfg, params, ids)), atol=2e-5, rtol=0)


# ------------------------------------------------------------------------ optimizer defaults


def test_the_default_optimizer_takes_a_model_without_biases_or_position_table():
    """The default no_decay patterns ("*bias", "wpe/*", ...) may match nothing; the norms (QK-norm's
    too) stay out of weight decay; a pattern outside the defaults that matches nothing is still refused."""
    from gptjax import optim
    from gptjax.schema import OptimConfig

    params = jax.eval_shape(lambda: init_params(LLAMA, jax.random.PRNGKey(0)))
    rows = {r.path: r.weight_decay for r in optim.make_optimizer(OptimConfig(), params, 100).describe()}
    assert not rows["h_0/attn/ln_q/scale"] and not rows["ln_f/scale"] and not rows["wte/embedding"]
    assert rows["h_0/attn/q_proj/kernel"] and rows["lm_head/kernel"]
    with pytest.raises(UserError, match="'c_attn/\\*' matches no parameter"):
        optim.make_optimizer(OptimConfig(no_decay="c_attn/*"), params, 100)
