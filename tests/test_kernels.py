"""Computations with a faster or smaller form against their plain reference, within fp32
tolerance: the eval step's chunked tied-head loss against full logits; each `model.attention`
option against the einsum attention (loss and gradients, with and without segment ids)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config as C
from gptjax import loss as loss_lib
from gptjax.loss import cross_entropy
from gptjax.errors import UserError
from gptjax.model import ATTENTION, GPT, GPTConfig, init_params
from gptjax.run import resolve


def _tiny_run(n_layer: int = 1, **model):
    config = C.base_config()
    config.model.update(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, **model)
    config.tokenizer.vocab_size = 300
    config.train.update(batch_size=8, seq_len=16)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    return resolve(config, None, devices=jax.devices()[:8])


def _packed_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int, n_sources: int) -> dict[str, np.ndarray]:
    """Rows of two or three packed examples each, some padding (weight 0), a source per row."""
    segment_ids = np.zeros((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        cuts = sorted(rng.choice(np.arange(2, seq - 2), size=int(rng.integers(1, 3)), replace=False))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq])):
            segment_ids[r, a:b] = i + 1
            positions[r, a:b] = np.arange(b - a)
    weights = (rng.random((rows, seq)) < 0.8).astype(np.float32)
    sources = np.eye(n_sources, dtype=np.float32)[np.arange(rows) % n_sources]
    sources[0] = 0.0  # a row that counts for no source
    return {
        "inputs": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
        "targets": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
        "weights": weights,
        "segment_ids": segment_ids,
        "positions": positions,
        "sources": sources,
    }


@pytest.mark.parametrize("chunk_bytes", [loss_lib.LOGITS_CHUNK_BYTES, 2 * 4 * 300 * 4])  # one chip holds 2 of the 8 rows
def test_eval_step_equals_the_full_logits_loss(monkeypatch, chunk_bytes):
    """The sharded eval step (chunked tied head: one chunk, then four sequence chunks) gives the
    loss of full logits, per source and overall, on packed rows with segment ids, and on plain rows."""
    monkeypatch.setattr(loss_lib, "LOGITS_CHUNK_BYTES", chunk_bytes)
    run = _tiny_run()  # one block: the head's chunking does not depend on depth
    params = run.steps.init_state().params
    batch = _packed_batch(np.random.default_rng(0), 8, 16, run.model.vocab_size, n_sources=3)
    plain = {k: batch[k] for k in ("inputs", "targets", "weights")}
    model, host = GPT(run.model), jax.tree_util.tree_map(np.asarray, params)
    apply = jax.jit(lambda inputs, positions, segment_ids: model.apply({"params": host}, inputs, positions, segment_ids=segment_ids))
    # Rows do not interact in the model: each reference is the full logits of the rows it counts,
    # taken from one forward pass over the whole batch (packed, then plain).
    full_logits = {"packed": apply(batch["inputs"], batch["positions"], batch["segment_ids"]),
                   "plain": apply(plain["inputs"], None, None)}

    def reference(b: dict[str, np.ndarray], rows: np.ndarray) -> float:
        logits = full_logits["packed" if "segment_ids" in b else "plain"][rows]
        s, n = cross_entropy(logits, jnp.asarray(b["targets"][rows]), jnp.asarray(b["weights"][rows]))
        return float(s / n)

    overall, per_source = run.steps.evaluate_sources(params, [batch])
    assert overall == pytest.approx(reference(batch, np.flatnonzero(batch["sources"].sum(1))), rel=1e-5)
    assert len(per_source) == 3
    for s, got in enumerate(per_source):
        assert got == pytest.approx(reference(batch, np.flatnonzero(batch["sources"][:, s])), rel=1e-5)
    assert run.steps.evaluate_sources(params, [plain]) == (pytest.approx(reference(plain, np.arange(8)), rel=1e-5), None)


def test_every_attention_option_names_an_implementation():
    """The config's `model.attention` choices (checked without Flax) are the attention table's keys."""
    from gptjax.model.attention import IMPLEMENTATIONS

    assert tuple(IMPLEMENTATIONS) == ATTENTION


# splash runs in Pallas interpret mode here (slow): its own tests below cover plain, packed,
# padded and sharded rows.
@pytest.mark.parametrize("attention", [a for a in ATTENTION if a not in ("xla", "splash")])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_option_gives_the_reference_loss_and_gradients(attention, packed):
    """Loss and every parameter's gradient equal those of the einsum attention ("xla"), on
    plain rows and on packed rows (segment ids, per-example positions)."""
    # One block: the attention's gradients reach every parameter, as they would through more.
    reference = GPTConfig(vocab_size=97, n_layer=1, n_head=4, n_embd=32, block_size=16)
    params = init_params(reference, jax.random.PRNGKey(0))
    batch = _packed_batch(np.random.default_rng(1), 4, 16, 97, n_sources=1)
    segments = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]} if packed else {}

    def loss_and_grads(cfg: GPTConfig) -> tuple[jax.Array, dict]:
        def loss(p: dict) -> jax.Array:
            logits = GPT(cfg).apply({"params": p}, batch["inputs"], segments.get("positions"),
                                    segment_ids=segments.get("segment_ids"))
            s, n = cross_entropy(logits, batch["targets"], batch["weights"])
            return s / n

        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want_grads = loss_and_grads(reference)
    got_loss, got_grads = loss_and_grads(dataclasses.replace(reference, attention=attention))
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    for (path, want), got in zip(flat_want, jax.tree_util.tree_leaves(got_grads)):
        scale = float(np.abs(want).max()) or 1.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_attention_option_is_checked():
    with pytest.raises(UserError, match="model.attention must be one of"):
        GPTConfig(vocab_size=97, attention="flash")
    with pytest.raises(UserError, match="no attention dropout"):
        GPTConfig(vocab_size=97, attention="dot_product", dropout=0.1)


def _splash_loss_and_grads(run, batch: dict[str, np.ndarray]) -> tuple[jax.Array, dict, str]:
    """Loss and gradients of `run`'s model on the sharded batch, under the run's mesh and rules
    (as its train step runs), and the jaxpr of that computation."""
    steps = run.steps
    params = steps.init_state().params
    global_batch = steps.layout.to_global(batch, accum=False)

    def loss(p: dict, b: dict) -> jax.Array:
        logits = GPT(run.model).apply({"params": p}, b["inputs"], b["positions"], segment_ids=b["segment_ids"])
        s, n = cross_entropy(logits, b["targets"], b["weights"])
        return s / n

    fn = jax.jit(jax.value_and_grad(loss))
    with steps.layout.context():
        value, grads = fn(params, global_batch)
        jaxpr = str(jax.make_jaxpr(fn)(params, global_batch))
    return value, grads, jaxpr


def test_splash_attention_on_a_mesh_gives_the_reference_loss_and_gradients():
    """model.attention='splash' on a data x fsdp x tensor mesh (the kernel in shard_map over
    batch and heads; Pallas interpret mode on the CPU) gives the einsum attention's loss and
    gradients on packed rows with segment ids."""
    batch = _packed_batch(np.random.default_rng(2), 8, 16, 300, n_sources=1)
    batch = {k: batch[k] for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    # One block: its attention's gradients (the kernel's dq and dkv) reach every parameter below it.
    want_loss, want_grads, _ = _splash_loss_and_grads(_tiny_run(n_layer=1), batch)
    got_loss, got_grads, jaxpr = _splash_loss_and_grads(_tiny_run(n_layer=1, attention="splash"), batch)
    assert "pallas_call" in jaxpr and "shard_map" in jaxpr
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree_util.tree_leaves(got_grads)):
        scale = float(np.abs(want).max()) or 1.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("seq,padded", [(24, True), (128, False)])
def test_splash_attention_matches_the_reference_on_real_tokens(seq, padded):
    """The kernel's outputs and input gradients equal the einsum attention's at every real
    token: with left padding (token_mask) on a sequence that is not a multiple of the kernel's
    block (padded at its end), and with neither (the kernel without segment ids)."""
    from gptjax.model.splash import splash_attention
    from gptjax.model import attention_mask

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 2, seq, 8)), jnp.float32) for _ in range(3))
    token_mask = np.ones((2, seq), bool)
    if padded:
        token_mask[0, :5] = False
    real = jnp.asarray(np.broadcast_to(token_mask[:, None, :, None], q.shape))
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32) * real

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8)
        scores = jnp.where(attention_mask(seq, jnp.asarray(token_mask), None), scores, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, -1), v)

    def kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return splash_attention(q, k, v, jnp.asarray(token_mask) if padded else None, None)

    def for_real(f):
        """Outputs, <outputs, cotangent> and its gradients (the pullback of the cotangent): one program."""
        def outputs_and_grads(*a: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
            out, pullback = jax.vjp(f, *a)
            return out, jnp.sum(out * cotangent), pullback(cotangent)
        return jax.jit(outputs_and_grads)

    want_out, want, want_grads = for_real(reference)(q, k, v)
    got_out, got, got_grads = for_real(kernel)(q, k, v)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    np.testing.assert_allclose(np.asarray(got_out)[np.asarray(real)], np.asarray(want_out)[np.asarray(real)], rtol=0, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5, err_msg=name)


def test_splash_attention_refuses_a_gpu(monkeypatch):
    from gptjax.model.splash import splash_attention

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.zeros((1, 2, 8, 4), jnp.float32)
    with pytest.raises(UserError, match="on a GPU use model.attention='dot_product'"):
        splash_attention(x, x, x, None, None)


def test_splash_train_step_compiles_for_v5e_2x2_with_the_kernel():
    """With libtpu: the train step with model.attention='splash' compiles for a v5e:2x2 slice
    (batch over fsdp, heads over tensor) with the Pallas kernels (forward, backward) as TPU
    custom calls in the compiled program, each on its shard: 4 of the 8 rows, 1 of the 2 heads
    (the backward one fused kernel for dq, dk and dv: `gptjax.model.splash.block_sizes`)."""
    import re

    from gptjax import aot
    from gptjax import config as config_lib

    if not aot.libtpu_installed():
        pytest.skip('libtpu is not installed (pip install -e ".[tpu]")')
    overrides = [("model.n_layer", "1"), ("model.n_embd", "128"), ("model.n_head", "2"), ("model.block_size", "128"),
                 ("model.dtype", "bfloat16"), ("model.attention", "splash"), ("train.seq_len", "128"),
                 ("train.batch_size", "8"), ("mesh.data", "1"), ("mesh.fsdp", "2"), ("mesh.tensor", "2")]
    config = config_lib.base_config()
    config_lib.apply_overrides(config, overrides)
    (train,) = aot.check(config, "v5e:2x2", programs=("train",), search=False).columns
    assert train.compiled.oom_used is None and train.compiled.flops > 0
    calls = [line for line in train.compiled.executable.as_text().splitlines()
             if 'custom_call_target="tpu_custom_call"' in line]
    kernels = sorted(m.group(1) for m in (re.match(r"\s*%splash_mha_(fwd|dq|dkv)_", line) for line in calls) if m)
    assert len(calls) == 2 and kernels == ["dkv", "fwd"]
    assert all("bf16[4,1,128,64]" in line for line in calls)
