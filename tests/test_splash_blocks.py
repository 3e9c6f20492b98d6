"""The splash kernels' block sizes and the fused backward kernel (`gptjax.model.splash.block_sizes`):
the blocks chosen per sequence length, and the fused dq/dk/dv kernel's gradients equal to the
einsum reference's with several key blocks (dq summed over their partials) and with a key
block computed in several steps (Pallas interpret mode on the CPU: tiny shapes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.model import attention_mask
from gptjax.model import splash as splash_lib


def test_block_sizes_per_sequence_length():
    gpt2 = splash_lib.block_sizes(1024)  # GPT-2's sequence: the backward one query and one key block
    assert (gpt2.block_q, gpt2.block_kv, gpt2.block_kv_compute) == (512, 512, 512)
    assert (gpt2.block_q_dkv, gpt2.block_kv_dkv, gpt2.block_kv_dkv_compute) == (1024, 1024, 512)
    assert gpt2.use_fused_bwd_kernel and gpt2.block_q_dq is None and gpt2.block_kv_dq is None
    odd = splash_lib.block_sizes(768)  # each block divides the sequence, each compute block its block
    assert (odd.block_q, odd.block_kv, odd.block_kv_compute) == (384, 384, 384)
    assert (odd.block_q_dkv, odd.block_kv_dkv, odd.block_kv_dkv_compute) == (768, 768, 384)
    longer = splash_lib.block_sizes(4096)
    assert (longer.block_q, longer.block_kv_dkv, longer.block_kv_dkv_compute) == (512, 1024, 512)
    short = splash_lib.block_sizes(128)
    assert (short.block_q, short.block_kv, short.block_kv_compute, short.block_kv_dkv) == (128, 128, 128, 128)


@pytest.mark.parametrize("forward_block,max_block,compute_block", [(128, 128, 128), (256, 256, 128)])
def test_fused_backward_matches_the_reference(monkeypatch, forward_block, max_block, compute_block):
    """A 256-token sequence with segment ids: two 128-token query and key blocks (the backward's
    dq from two partials), or one 256-token block computed 128 keys at a time; outputs and
    q, k, v gradients equal the einsum attention's."""
    monkeypatch.setattr(splash_lib, "FORWARD_BLOCK", forward_block)
    monkeypatch.setattr(splash_lib, "MAX_BLOCK", max_block)
    monkeypatch.setattr(splash_lib, "COMPUTE_BLOCK", compute_block)
    seq, d = 256, 8
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, seq, d)), jnp.float32) for _ in range(3))
    segment_ids = jnp.asarray(np.repeat([[1, 2]], seq // 2, axis=1).reshape(1, seq))
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d)
        scores = jnp.where(attention_mask(seq, None, segment_ids), scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, -1), v)

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return splash_lib.splash_attention(q, k, v, None, segment_ids)

    def outputs_and_grads(f):
        out, pullback = jax.vjp(f, q, k, v)
        return out, pullback(cotangent)

    want_out, want_grads = jax.jit(lambda: outputs_and_grads(reference))()
    got_out, got_grads = jax.jit(lambda: outputs_and_grads(kernel))()
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=0, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5, err_msg=name)
