"""`model.head_loss="kernel"`: the head's cross entropy by Pallas kernels (`gptjax.model.head_kernel`)
that keep each logits tile on chip. On the CPU the same kernel code runs in Pallas interpret
mode; it must give the reference path's loss sums, d hidden and d table within fp32 tolerance
(padded vocabulary rows, masked tokens, softcap, several token and vocabulary blocks with a
ragged tail), the same eval sums per source, and the same train step on a 2-device mesh. The
AOT counts charge its kernels their matmuls and block traffic (a v5e compile; needs libtpu)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu

from gptjax import aot, loss
from gptjax.aot import counts as counts_lib
from gptjax.errors import UserError
from gptjax.model import GPTConfig, head_kernel, init_params
from gptjax.model.platform import resolve_head_loss
from gptjax.state import TrainState
from gptjax.step import train_step

ROWS, VALID, EMBD = 320, 300, 32  # a table with 20 padded rows


def _inputs(b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, EMBD)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(ROWS, EMBD)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, VALID, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.random((b, t)) > 0.25, jnp.float32)  # a quarter of the tokens masked
    return hidden, table, targets, weights


def _value_and_grads(f, hidden, table):
    return jax.value_and_grad(lambda h, w: f(h, w)[0], argnums=(0, 1))(hidden, table)


@pytest.mark.parametrize(
    "softcap, blocks, tpu_interpret",
    [(0.0, None, False), (3.0, None, False), (0.0, (128, 128), False), (3.0, (128, 128), True)],
    ids=["one-block", "one-block-softcap", "ragged-blocks", "ragged-blocks-softcap-tpu-interpret"],
)
def test_loss_and_gradients_equal_the_reference(monkeypatch, softcap, blocks, tpu_interpret):
    """One block each way (defaults), and 128-token x 128-row blocks over 160 tokens (padded
    to 2 token blocks) and 320 rows (3 vocabulary blocks, the last past the table's end); the
    last case in Pallas's TPU interpret mode, which simulates the chip's HBM, VMEM and DMAs
    (memory never written reads as NaN)."""
    if tpu_interpret:
        monkeypatch.setattr(head_kernel, "INTERPRET", pltpu.InterpretParams(uninitialized_memory="nan"))
    if blocks:
        monkeypatch.setattr(head_kernel, "BLOCK_ELEMENTS", blocks[0] * EMBD)
        monkeypatch.setattr(head_kernel, "BLOCK_VOCAB", blocks[1])
    hidden, table, targets, weights = _inputs(5, 32)

    def full(h, w):  # cross_entropy on whole logits, padded rows cut
        logits = h @ w.T
        logits = softcap * jnp.tanh(logits / softcap) if softcap else logits
        return loss.cross_entropy(logits[..., :VALID], targets, weights)

    chunked = lambda h, w: loss.head_cross_entropy(h, w, targets, weights, VALID, softcap)
    kernel = lambda h, w: loss.head_cross_entropy(h, w, targets, weights, VALID, softcap, kernel=True)
    got_loss, got_grads = _value_and_grads(kernel, hidden, table)
    assert float(kernel(hidden, table)[1]) == float(weights.sum())
    for reference in (full, chunked):
        want_loss, want_grads = _value_and_grads(reference, hidden, table)
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
        for got, want in zip(got_grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(got_grads[1][VALID:]) and np.any(got_grads[1][:VALID])  # padded rows: no gradient


def test_eval_sums_per_source_equal_the_reference():
    hidden, table, targets, weights = _inputs(4, 16, seed=1)
    sources = jnp.asarray([[1, 0], [0, 1], [1, 0], [0, 0]], jnp.float32)
    want = loss.head_eval_sums(hidden, table, targets, weights, sources, vocab_size=VALID)
    got = loss.head_eval_sums(hidden, table, targets, weights, sources, vocab_size=VALID, kernel=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    assert got[0].shape == (2,)


def test_the_setting_is_validated_and_auto_takes_the_kernel_on_a_tpu_only():
    with pytest.raises(UserError, match="model.head_loss must be one of"):
        GPTConfig(vocab_size=97, head_loss="pallas")
    cfg = GPTConfig(vocab_size=97)
    assert cfg.head_loss == "xla" and resolve_head_loss(cfg, "tpu") == "xla"
    auto = dataclasses.replace(cfg, head_loss="auto")
    assert [resolve_head_loss(auto, p) for p in ("tpu", "gpu", "cpu")] == ["kernel", "xla", "xla"]


def test_the_kernel_is_refused_on_a_gpu(monkeypatch):
    monkeypatch.setattr(head_kernel, "trace_platform", lambda: "gpu")
    hidden, table, targets, weights = _inputs(1, 8)
    with pytest.raises(UserError, match="model.head_loss='kernel' is a TPU kernel"):
        loss.head_cross_entropy(hidden, table, targets, weights, VALID, kernel=True)


def test_a_train_step_on_a_two_device_mesh_equals_the_default():
    """fsdp over 2 CPU devices: the kernels run per batch shard and d table is summed over them."""
    base = GPTConfig(vocab_size=250, vocab_multiple=64, n_layer=1, n_head=2, n_embd=32, block_size=16)
    params = init_params(base, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 250, (1, 4, 17))
    batch = {"inputs": jnp.asarray(tokens[..., :-1], jnp.int32), "targets": jnp.asarray(tokens[..., 1:], jnp.int32),
             "weights": jnp.ones((1, 4, 16), jnp.float32)}
    tx = optax.sgd(0.1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2, 1), ("data", "fsdp", "tensor"))

    def step(gpt: GPTConfig):
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        with jax.set_mesh(mesh):
            return jax.jit(lambda s, b: train_step(s, b, gpt=gpt, tx=tx, schedule=lambda _: 0.1, seed=0, grad_accum=1,
                                                    nonfinite_guard=False))(state, batch)

    want_state, want = step(base)
    got_state, got = step(dataclasses.replace(base, head_loss="kernel"))
    for key in ("loss", "grad_norm"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5)
    for g, w in zip(jax.tree_util.tree_leaves(got_state.params), jax.tree_util.tree_leaves(want_state.params)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not aot.libtpu_installed(), reason='libtpu is not installed (pip install -e ".[tpu]")')
def test_the_aot_counts_charge_the_kernels_their_matmuls_and_blocks(monkeypatch):
    """512 tokens in blocks of 256, a 640-row bf16 table (600 real) in blocks of 256 (3 blocks,
    768 rows of grid) on one v5e chip: forward 2 N 768 C FLOPs, backward three times that; the
    table read once per token block in each pass, and d table's fp32 partial written once per
    token block."""
    monkeypatch.setattr(head_kernel, "BLOCK_ELEMENTS", 256 * 128)
    monkeypatch.setattr(head_kernel, "BLOCK_VOCAB", 256)
    _, devices = aot.topology_devices("v5e:1x1")
    n, c, rows, valid = 512, 128, 640, 600
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(devices[0]))

    def grads(h, w, tg):
        return jax.grad(lambda h, w: head_kernel.kernel_token_losses(h, w, tg, valid).sum(), argnums=(0, 1))(h, w)

    with jax.set_mesh(jax.sharding.Mesh(devices[:1], ("fsdp",))):  # traced for the TPU: the kernels, not interpreted
        compiled = jax.jit(grads).lower(spec((1, n, c), jnp.bfloat16), spec((rows, c), jnp.float32),
                                        spec((1, n), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    counts = counts_lib.count(compiled.as_text(), cost["flops"], cost["bytes accessed"])
    kernels = {o.name.split(".")[0]: o for o in counts.ops if o.kind == "kernel"}
    fwd, bwd = kernels["gptjax_head_ce_fwd"], kernels["gptjax_head_ce_bwd"]
    assert (fwd.flops, bwd.flops) == (2 * n * 768 * c, 6 * n * 768 * c)
    table_reads = 2 * rows * c * 2  # 2 token blocks x the whole bf16 table
    assert fwd.hbm_bytes == n * c * 2 + 3 * n * 4 + table_reads
    assert bwd.hbm_bytes == 2 * n * c * 2 + 3 * n * 4 + table_reads + 2 * rows * c * 4
    assert counts.flops >= 8 * n * valid * c  # at least the head's own matmuls


@pytest.mark.skipif(not aot.libtpu_installed(), reason='libtpu is not installed (pip install -e ".[tpu]")')
def test_blocks_follow_the_chips_vmem():
    """GPT-2's head over 16,384 tokens per chip: 8,192-token x 256-row blocks on v5e and v6e
    (128 MiB of VMEM per core), half of each on v5p (64 MiB); a wider model, fewer tokens."""
    for topology, want in (("v5e:1x1", (8192, 256)), ("v6e:1x1", (8192, 256)), ("v5p:2x2x1", (4096, 128))):
        _, devices = aot.topology_devices(topology)
        with jax.set_mesh(jax.sharding.Mesh(devices[:1], ("fsdp",))):
            tm, n_pad, tv, nv = head_kernel._blocks(16384, 768, 50304, 50257)
            assert (tm, tv, n_pad, nv) == (*want, 16384, -(-50257 // want[1]))
            assert head_kernel._blocks(16384, 1600, 50304, 50257)[0] == want[0] // 4  # 3,932 at most: 2,048 divides
