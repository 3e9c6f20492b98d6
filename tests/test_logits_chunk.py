"""`model.logits_chunk_mib`: how many fp32 logits per chip the tied head's chunked cross entropy
makes at once (0: the platform's default). Any chunking gives the one-chunk loss and gradients;
the budget sets the number of chunks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import loss
from gptjax.errors import UserError
from gptjax.model import GPTConfig


def test_the_budget_sets_the_chunks():
    b, t, vocab = 2, 32, 256  # one chip's fp32 logits: 2 * 32 * 256 * 4 = 64 KiB
    assert loss._seq_chunks(b, t, vocab, 64 * 1024) == 1
    assert loss._seq_chunks(b, t, vocab, 16 * 1024) == 4
    assert loss._seq_chunks(b, t, vocab, 0) == 1  # the CPU's default, 64 MiB


def test_chunked_loss_and_gradients_equal_one_chunk():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 32, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(256, 16)) * 0.1, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 250, (2, 32)), jnp.int32)
    weights = jnp.ones((2, 32), jnp.float32)

    def loss_and_grads(chunk_bytes: int):
        f = lambda h, w: loss.head_cross_entropy(h, w, targets, weights, 250, 0.0, chunk_bytes)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(hidden, table)

    want_loss, want_grads = loss_and_grads(64 * 1024)  # one chunk
    got_loss, got_grads = loss_and_grads(16 * 1024)  # four
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    eval_sum, _ = loss.head_eval_sums(hidden, table, targets, weights, vocab_size=250, chunk_bytes=16 * 1024)
    assert float(eval_sum) == pytest.approx(float(want_loss), rel=1e-6)


def test_a_negative_budget_is_refused():
    with pytest.raises(UserError, match="model.logits_chunk_mib"):
        GPTConfig(vocab_size=97, logits_chunk_mib=-1)
    assert dataclasses.replace(GPTConfig(vocab_size=97), logits_chunk_mib=2048).logits_chunk_mib == 2048
