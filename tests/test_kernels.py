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


def _tiny_run(**model):
    config = C.base_config()
    config.model.update(n_layer=2, n_head=2, n_embd=32, block_size=16, **model)
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


@pytest.mark.parametrize("chunk_bytes", [loss_lib.LOGITS_CHUNK_BYTES, 8 * 4 * 300 * 4])
def test_eval_step_equals_the_full_logits_loss(monkeypatch, chunk_bytes):
    """The sharded eval step (chunked tied head: one chunk, then four sequence chunks) gives the
    loss of full logits, per source and overall, on packed rows with segment ids, and on plain rows."""
    monkeypatch.setattr(loss_lib, "LOGITS_CHUNK_BYTES", chunk_bytes)
    run = _tiny_run()
    params = run.trainer.init_state().params
    batch = _packed_batch(np.random.default_rng(0), 8, 16, run.model.vocab_size, n_sources=3)
    plain = {k: batch[k] for k in ("inputs", "targets", "weights")}
    model, host = GPT(run.model), jax.tree_util.tree_map(np.asarray, params)

    def reference(b: dict[str, np.ndarray], rows: np.ndarray) -> float:
        packed = {k: b[k][rows] for k in ("positions", "segment_ids") if k in b}
        logits = model.apply({"params": host}, b["inputs"][rows], packed.get("positions"),
                             segment_ids=packed.get("segment_ids"))
        s, n = cross_entropy(logits, jnp.asarray(b["targets"][rows]), jnp.asarray(b["weights"][rows]))
        return float(s / n)

    overall, per_source = run.trainer.evaluate_sources(params, [batch])
    assert overall == pytest.approx(reference(batch, np.flatnonzero(batch["sources"].sum(1))), rel=1e-5)
    assert len(per_source) == 3
    for s, got in enumerate(per_source):
        assert got == pytest.approx(reference(batch, np.flatnonzero(batch["sources"][:, s])), rel=1e-5)
    assert run.trainer.evaluate_sources(params, [plain]) == (pytest.approx(reference(plain, np.arange(8)), rel=1e-5), None)


@pytest.mark.parametrize("attention", [a for a in ATTENTION if a != "xla"])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_option_gives_the_reference_loss_and_gradients(attention, packed):
    """Loss and every parameter's gradient equal those of the einsum attention ("xla"), on
    plain rows and on packed rows (segment ids, per-example positions)."""
    reference = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=16)
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
