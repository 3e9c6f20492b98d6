"""The splash kernel's query scale folded into the fused c_attn projection
(`gptjax.model.attention.folded_q_scale`): applied in fp32 before q is rounded to the compute
dtype, where 1 / sqrt(head_dim) is a power of two, so q is bit for bit what the kernel's own
scaling made, and XLA fuses the scale into the projection instead of another pass over q."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import GPT, GPTConfig, init_params
from gptjax.model import attention as attention_lib
from gptjax.model.attention import folded_q_scale
from gptjax.model.layers import QKVProjection

TINY = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16, dtype="bfloat16")  # head_dim 16


def test_the_scale_is_folded_only_where_it_is_exact():
    assert folded_q_scale(TINY, "splash", False) == 0.25
    assert folded_q_scale(dataclasses.replace(TINY, n_embd=128, n_head=2), "splash", False) == 0.125  # head_dim 64
    assert folded_q_scale(dataclasses.replace(TINY, n_head=1), "splash", False) == 1.0  # head_dim 32: 1/sqrt(32)
    for other in ("xla", "dot_product", None):
        assert folded_q_scale(TINY, other, False) == 1.0
    assert folded_q_scale(TINY, "splash", True) == 1.0  # the decode layout
    for change in ({"qk_norm": True}, {"position": "rope"}, {"n_kv_head": 1}):
        assert folded_q_scale(dataclasses.replace(TINY, **change), "splash", False) == 1.0, change


def test_the_folded_projection_is_bit_equal_to_scaling_after_rounding():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 32)), jnp.float32)
    plain, folded = QKVProjection(TINY), QKVProjection(TINY, q_scale=0.25)
    params = plain.init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda p: p + 0.01, params)  # a non-zero bias too
    q, k, v = plain.apply(params, x)
    fq, fk, fv = folded.apply(params, x)
    assert fq.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(fq, np.float32), np.asarray((q.astype(jnp.float32) * 0.25).astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(np.asarray(fk, np.float32), np.asarray(k, np.float32))
    np.testing.assert_array_equal(np.asarray(fv, np.float32), np.asarray(v, np.float32))


def test_a_splash_model_gives_the_same_logits_folded_or_not(monkeypatch):
    """The kernel in interpret mode on the CPU: the model with the scale folded gives the
    logits of the kernel scaling q itself, exactly."""
    cfg = dataclasses.replace(TINY, attention="splash")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 16)), jnp.int32)
    folded = GPT(cfg).apply({"params": params}, tokens)
    monkeypatch.setattr(attention_lib, "folded_q_scale", lambda *args: 1.0)
    plain = GPT(cfg).apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(folded), np.asarray(plain))
    assert not np.allclose(np.asarray(folded), 0.0)


def test_the_splash_path_takes_the_prescaled_kernel(monkeypatch):
    """With the fold, the kernel is called with q_scaled=True (it does not scale q again)."""
    from gptjax.model import splash

    cfg = dataclasses.replace(TINY, attention="splash")
    params = init_params(cfg, jax.random.PRNGKey(0))
    calls = []
    real = splash.splash_attention
    monkeypatch.setattr(splash, "splash_attention", lambda *a, **kw: calls.append(kw.get("q_scaled")) or real(*a, **kw))
    GPT(cfg).apply({"params": params}, jnp.zeros((1, 16), jnp.int32))
    assert calls == [True]
