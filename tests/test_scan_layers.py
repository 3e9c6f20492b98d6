"""`model.scan_layers`: a full pass runs the blocks as one scan over their stacked parameters.

It must compute what the unrolled blocks compute (loss and every gradient, plain and packed
rows, with and without remat), apply the layers in order, draw dropout from the rng it is
given, train on a mesh like the reference, and leave the parameter tree (`h_{i}`) as it is, so
its checkpoints load for sampling."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from gptjax import config as C
from gptjax import train
from gptjax.errors import UserError
from gptjax.loss import cross_entropy
from gptjax.model import GPT, GPTConfig, init_params
from gptjax.sampling import load

# Two layers: the stacking and the order of the layers are there (a third only makes every
# program bigger).
REFERENCE = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=16)


def _batch(packed: bool) -> dict[str, np.ndarray]:
    """Four rows of 16 tokens; packed: two or three examples per row (segment ids, positions)."""
    rng = np.random.default_rng(1)
    batch = {
        "inputs": rng.integers(0, 97, (4, 16)).astype(np.int32),
        "targets": rng.integers(0, 97, (4, 16)).astype(np.int32),
        "weights": (rng.random((4, 16)) < 0.8).astype(np.float32),
    }
    if packed:
        segment_ids = np.zeros((4, 16), np.int32)
        positions = np.zeros((4, 16), np.int32)
        for r in range(4):
            cuts = sorted(rng.choice(np.arange(2, 14), size=int(rng.integers(1, 3)), replace=False))
            for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, 16])):
                segment_ids[r, a:b] = i + 1
                positions[r, a:b] = np.arange(b - a)
        batch.update(segment_ids=segment_ids, positions=positions)
    return batch


def _loss_fn(cfg: GPTConfig, batch: dict[str, np.ndarray], deterministic: bool = True):
    def loss(params: dict, rng: jax.Array) -> jax.Array:
        logits = GPT(cfg).apply({"params": params}, batch["inputs"], batch.get("positions"),
                                segment_ids=batch.get("segment_ids"), deterministic=deterministic,
                                rngs={"dropout": rng})
        s, n = cross_entropy(logits, batch["targets"], batch["weights"])
        return s / n

    return loss


def _has_scan(cfg: GPTConfig, params: dict, batch: dict[str, np.ndarray]) -> bool:
    jaxpr = jax.make_jaxpr(_loss_fn(cfg, batch))(params, jax.random.PRNGKey(0))
    return any(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)


# Packed rows and remat are independent of each other: each is on in one case and off in the other.
@pytest.mark.parametrize("packed, remat", [(False, False), (True, True)], ids=["plain", "packed-remat"])
def test_scan_gives_the_unrolled_loss_and_every_gradient(packed, remat):
    """Same loss and gradient of every parameter (each `h_{i}` its own) as the unrolled
    blocks. The layers are not interchangeable: the reference with two layers swapped gives
    another loss, so a scan over the wrong order (or over one layer's parameters) fails here;
    and the option's forward pass is a scan, the reference's is not, so an ignored option fails."""
    params = init_params(REFERENCE, jax.random.PRNGKey(0))
    batch = _batch(packed)
    option = dataclasses.replace(REFERENCE, scan_layers=True, remat=remat)
    assert _has_scan(option, params, batch) and not _has_scan(REFERENCE, params, batch)

    def loss_and_grads(cfg: GPTConfig):
        return jax.jit(jax.value_and_grad(_loss_fn(cfg, batch)))

    reference = loss_and_grads(REFERENCE)  # compiled once, for the parameters and the swapped ones
    want_loss, want_grads = reference(params, jax.random.PRNGKey(0))
    got_loss, got_grads = loss_and_grads(option)(params, jax.random.PRNGKey(0))
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    assert jax.tree_util.tree_structure(got_grads) == jax.tree_util.tree_structure(want_grads)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree_util.tree_leaves(got_grads)):
        scale = float(np.abs(want).max()) or 1.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
    swapped = {**params, "h_0": params["h_1"], "h_1": params["h_0"]}
    assert abs(float(reference(swapped, jax.random.PRNGKey(0))[0]) - float(want_loss)) > 1e-4


def test_scan_with_dropout_is_deterministic_for_its_rng():
    """With dropout the scanned pass depends on the dropout rng only: the same rng gives the
    same loss and gradients (with remat too), another rng another loss, and both differ from
    the pass without dropout."""
    params = init_params(REFERENCE, jax.random.PRNGKey(0))
    batch = _batch(packed=True)
    cfg = dataclasses.replace(REFERENCE, scan_layers=True, dropout=0.2)
    grad = jax.jit(jax.value_and_grad(_loss_fn(cfg, batch, deterministic=False)))
    a, b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    loss_a, grads_a = grad(params, a)
    loss_a2, grads_a2 = grad(params, a)
    remat_a, remat_grads_a = jax.jit(jax.value_and_grad(_loss_fn(dataclasses.replace(cfg, remat=True), batch, False)))(params, a)
    assert float(loss_a) == float(loss_a2) == pytest.approx(float(remat_a), rel=1e-6)
    for g, g2, g3 in zip(*(jax.tree_util.tree_leaves(t) for t in (grads_a, grads_a2, remat_grads_a))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))
        np.testing.assert_allclose(np.asarray(g3), np.asarray(g), rtol=0, atol=1e-5 * (float(np.abs(g).max()) or 1.0))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads_a))
    assert float(grad(params, b)[0]) != pytest.approx(float(loss_a), rel=1e-4)
    assert float(jax.jit(_loss_fn(cfg, batch))(params, a)) != pytest.approx(float(loss_a), rel=1e-4)


def test_scan_layers_is_checked():
    with pytest.raises(UserError, match="model.scan_layers must be true or false"):
        GPTConfig(vocab_size=97, scan_layers="yes")
    config = C.base_config()
    assert config.model.scan_layers is False
    C.apply_overrides(config, [("model.scan_layers", "true")])
    assert config.model.scan_layers is True
    with pytest.raises(UserError, match="model.scan_layers expects a bool"):
        C.apply_overrides(config, [("model.scan_layers", "sometimes")])


def _metrics(workdir: str) -> dict[tuple[int, str], float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {(r["step"], k): r[k] for r in records for k in ("loss", "val_loss") if k in r}


def test_training_on_a_mesh_matches_the_unrolled_run_and_its_checkpoint_samples(trained_run, tmp_path):
    """Ten steps on 8 devices (data, fsdp and tensor 2 each: the parameters' logical
    shardings apply to the stacked ones), scanned and with remat, give the losses of the shared
    unrolled run (`trained_run`, one device) at every step and its evaluation at step 10; the
    checkpoint keeps `h_{i}` and loads for sampling, and its full pass (scanned) gives the
    reference checkpoint's logits."""
    c = trained_run.config()
    c.model.update(scan_layers=True, remat=True)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    scan = trained_run.tokenizer_only(tmp_path / "scan")
    assert train.run(c, scan, stop_at=10)["step"] == 10
    want, got = _metrics(trained_run.workdir), _metrics(scan)
    assert sorted(got) == sorted(k for k in want if k[0] <= 10) and (10, "val_loss") in got
    for key in sorted(got):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key

    ref = os.path.join(trained_run.workdir, "checkpoints", "10")
    loaded, reference = load(scan), load(ref)
    assert loaded.model_config.scan_layers and not reference.model_config.scan_layers
    assert sorted(k for k in loaded.params if k.startswith("h_")) == ["h_0", "h_1"]
    tokens = np.random.default_rng(0).integers(0, 300, (2, 32)).astype(np.int32)
    logits = jax.jit(GPT(loaded.model_config).apply)({"params": loaded.params}, tokens)
    want = jax.jit(GPT(reference.model_config).apply)({"params": reference.params}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-4, rtol=0)
    new = loaded.generate_tokens([[1, 2, 3]], max_new_tokens=5, temperature=0.0, stop_tokens=())
    assert len(new[0]) == 5
