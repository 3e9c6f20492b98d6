"""`model.activation_dtype`: the MLP's hidden pre-activation kept (and saved for the backward
pass) in bf16, an opt-in for the accelerator recipes that halves the block's largest activation.

The default (float32) is the reference itself; bf16 rounds the pre-activation once, so with a
bf16 compute dtype the loss and gradients stay those of the fp32-activation model within bf16
rounding. Tiny models on the CPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import UserError
from gptjax.loss import cross_entropy
from gptjax.model import GPT, GPTConfig, init_params

TINY = GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=32, block_size=16)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 16)), jnp.int32)


def _loss_and_grads(cfg: GPTConfig, params: dict) -> tuple[float, dict]:
    def loss(p: dict) -> jax.Array:
        s, n = cross_entropy(GPT(cfg).apply({"params": p}, TOKENS[:, :-1]), TOKENS[:, 1:], jnp.ones((4, 15)))
        return s / n

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), grads


def _relative_error(got: dict, want: dict) -> float:
    """The largest, over parameters, of |got - want| / |want| (Frobenius norms)."""
    errors = jax.tree_util.tree_map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)), got, want)
    return max(jax.tree_util.tree_leaves(errors))


@pytest.mark.parametrize("mlp, policy", [("gelu", "everything"), ("swiglu", "dots")])
def test_bf16_activations_give_the_reference_loss_and_gradients_within_bf16_rounding(mlp, policy):
    reference = dataclasses.replace(TINY, mlp=mlp, dtype="bfloat16")
    params = init_params(reference, jax.random.PRNGKey(0))
    want_loss, want_grads = _loss_and_grads(reference, params)
    cfg = dataclasses.replace(reference, activation_dtype="bfloat16", remat_policy=policy)
    got_loss, got_grads = _loss_and_grads(cfg, params)
    assert got_loss == pytest.approx(want_loss, rel=2e-3)
    assert 0 < _relative_error(got_grads, want_grads) < 2e-2  # a change, within bf16 rounding


def test_the_jaxpr_keeps_the_hidden_pre_activation_in_bf16():
    """With activation_dtype=bfloat16 the c_fc output is rounded to bf16 (a convert to bf16 of
    the [batch, seq, 4 * n_embd] pre-activation); the default makes no such array."""
    params = init_params(TINY, jax.random.PRNGKey(0))

    def bf16_hidden(cfg: GPTConfig) -> int:
        jaxpr = jax.make_jaxpr(lambda p: GPT(cfg).apply({"params": p}, TOKENS))(params)
        return sum(1 for e in jaxpr.eqns for v in e.outvars
                   if v.aval.dtype == jnp.bfloat16 and v.aval.shape == (4, 16, 4 * TINY.n_embd))

    assert bf16_hidden(TINY) == 0
    assert bf16_hidden(dataclasses.replace(TINY, activation_dtype="bfloat16")) >= TINY.n_layer


def test_a_wrong_activation_dtype_is_refused():
    with pytest.raises(UserError, match="model.activation_dtype"):
        dataclasses.replace(TINY, activation_dtype="int8")
