"""Muon for the hidden matrices (`optim.hidden = "muon"`): the same steps as optax's own Muon and
Adam on a tiny GPT's tree, the per-parameter rules on top of it, the dry-run table, bad input,
and Muon's state checkpointed and resumed bit for bit."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

from gptjax import checkpoint as ckpt
from gptjax import muon as muon_lib
from gptjax import optim, sharding
from gptjax.errors import UserError
from gptjax.schema import OptimConfig, parse
from gptjax.layout import RunDir
from gptjax.model import GPTConfig
from gptjax.state import TrainState, init_boxed_params, param_shapes
from gptjax.step import build_steps


def make_optimizer(cfg: Any, params: Any, total_steps: int) -> optim.Optimizer:
    """`optim.make_optimizer` of an optim section given as a dict, parsed as a run parses it."""
    return optim.make_optimizer(parse(OptimConfig, cfg, "optim"), params, total_steps)


CFG = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16)
MUON = dict(hidden="muon", lr=1e-2, muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.1, schedule="constant",
            warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
# How each kernel is a matrix, written out by hand: the fused q/k/v kernel [embed, 3, heads, head_dim]
# is three [embed, heads*head_dim] matrices; the attention output [heads, head_dim, embed] one matrix.
REFERENCE_DIMS = {
    "attn/c_attn/kernel": Dims(reduction_axis=0, output_axis=(2, 3)),
    "attn/c_proj/kernel": Dims(reduction_axis=(0, 1), output_axis=2),
    "mlp/c_fc/kernel": Dims(reduction_axis=0, output_axis=1),
    "mlp/c_proj/kernel": Dims(reduction_axis=0, output_axis=1),
}


@pytest.fixture(scope="module")
def params() -> Any:
    return nn.meta.unbox(jax.jit(lambda r: init_boxed_params(CFG, r))(jax.random.PRNGKey(0)))


def grads_of(params: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)


def run(tx: optax.GradientTransformation, params: Any, steps: int = 3) -> list[Any]:
    state, update, out = tx.init(params), jax.jit(tx.update), []
    for s in range(steps):
        updates, state = update(grads_of(params, s), state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def is_kernel(path: str) -> bool:
    return path.startswith("h_") and path.endswith("kernel")


def reference(params: Any) -> optax.GradientTransformation:
    """optax's Muon for the block kernels, optax's Adam for the rest, labelled by hand."""
    paths = jax.tree_util.tree_map_with_path(lambda p, _: optim._path_str(p), params)
    labels = jax.tree.map(lambda p: "muon" if is_kernel(p) else "adam", paths)
    dims = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731  (Adam's leaves are MaskedNodes here)
        lambda p, _: REFERENCE_DIMS[optim._path_str(p).split("/", 1)[1]], tree)
    return optax.partition(
        {"muon": optax.contrib.muon(0.05, beta=0.9, weight_decay=0.1, muon_weight_dimension_numbers=dims),
         "adam": optax.adam(1e-2, 0.9, 0.95, 1e-8)},
        labels,
    )


def test_muon_steps_match_optax_and_the_table_names_the_optimizer(params: Any) -> None:
    boxed = param_shapes(CFG, boxed=True)
    opt = make_optimizer(MUON, boxed, 100)
    ours, theirs = run(opt.tx, params), run(reference(params), params)
    for a, b in zip(ours, theirs):
        flat_a = {optim._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
        flat_b = {optim._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # Muon's orthogonalized updates are not Adam's: each q/k/v slice has singular values near 1
    # (times the lr and the width scale sqrt(max(1, fan_out / fan_in)) = 1 here).
    q = np.asarray(ours[0]["h_0"]["attn"]["c_attn"]["kernel"][:, 0]).reshape(16, 16) / -0.05
    assert 0.5 < np.linalg.svd(q, compute_uv=False).min() and np.linalg.svd(q, compute_uv=False).max() < 1.5

    table = optim.format_param_table(boxed, opt).splitlines()
    assert table[0].split()[-1] == "optimizer"
    rows = {line.split()[0]: line.split() for line in table[2:] if line and not line.endswith(":")}
    assert rows["h_0/attn/c_proj/kernel"][2:] == ["muon/lr_x1", "1", "yes", "yes", "muon"]
    assert rows["h_0/attn/c_proj/bias"][-1] == rows["wte/embedding"][-1] == rows["ln_f/scale"][-1] == "adamw"
    assert any(line.startswith("muon:") and "4 tensors" in line for line in table)


def test_the_kernels_of_the_modern_blocks_are_matrices_by_their_axis_names() -> None:
    """Grouped-query attention and SwiGLU (the modern recipe's blocks): which parameters Muon takes
    and how it reads each kernel; the untied head, embeddings and norms stay AdamW's."""
    cfg = GPTConfig(vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, block_size=16, position="rope",
                    norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False)
    opt = make_optimizer({**MUON, "no_decay": "*ln_*,ln_f/*,wte/*,lm_head/*"}, param_shapes(cfg, boxed=True), 10)
    muon_rows = {r.path: r.shape for r in opt.describe() if r.optimizer == "muon"}
    blocks = ["attn/q_proj", "attn/kv_proj", "attn/c_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]
    assert sorted(muon_rows) == sorted(f"h_0/{m}/kernel" for m in blocks)
    names = jax.tree.map(lambda x: x.names, param_shapes(cfg, boxed=True), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    dims = {p: muon_lib.dimension_numbers(p, s, names["h_0"][p.split("/")[1]][p.split("/")[2]]["kernel"])
            for p, s in muon_rows.items()}
    assert dims["h_0/attn/q_proj/kernel"] == Dims(reduction_axis=(0,), output_axis=(1, 2))
    assert dims["h_0/attn/kv_proj/kernel"] == Dims(reduction_axis=(0,), output_axis=(2, 3))  # axis 1: keys | values
    assert dims["h_0/attn/c_proj/kernel"] == Dims(reduction_axis=(0, 1), output_axis=(2,))
    assert dims["h_0/mlp/down_proj/kernel"] == Dims(reduction_axis=(0,), output_axis=(1,))


def test_freeze_and_lr_rules_apply_to_muon(params: Any, xla_default_fusion_emitters: None) -> None:
    # c_proj's update is compared across two programs (one with a frozen kernel) to a few ulps,
    # which Newton-Schulz's iterations amplify: as XLA compiles it by default (conftest).
    boxed = param_shapes(CFG, boxed=True)
    base = run(make_optimizer(MUON, boxed, 100).tx, params, steps=1)[0]
    opt = make_optimizer({**MUON, "freeze": "h_0/attn/c_attn", "lr_rules": "h_0/mlp/*=0.5"}, boxed, 100)
    ruled = run(opt.tx, params, steps=1)[0]
    assert not np.any(ruled["h_0"]["attn"]["c_attn"]["kernel"])
    np.testing.assert_allclose(ruled["h_0"]["mlp"]["c_fc"]["kernel"], 0.5 * base["h_0"]["mlp"]["c_fc"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(ruled["h_0"]["attn"]["c_proj"]["kernel"], base["h_0"]["attn"]["c_proj"]["kernel"], rtol=1e-5, atol=1e-7)
    # A frozen kernel holds no Muon momentum.
    shapes = [x.shape for x in jax.tree.leaves(jax.eval_shape(opt.tx.init, params))]
    assert (16, 3, 2, 8) not in shapes and (2, 8, 16) in shapes


@pytest.mark.parametrize("field, value, message", [
    ("hidden", "sgd", "optim.hidden must be one of ['adamw', 'muon']"),
    ("muon_momentum", 1.0, "optim.muon_momentum must be in [0, 1)"),
    ("muon_lr", 0.0, "optim.muon_lr must be a positive number"),
])
def test_bad_muon_settings_are_one_line(params: Any, field: str, value: Any, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        make_optimizer({**MUON, field: value}, params, 100)


def test_muon_needs_the_axis_names_of_a_multi_axis_kernel(params: Any) -> None:
    with pytest.raises(ValueError, match="logical axis names"):
        make_optimizer(MUON, params, 100)  # unboxed: c_attn's four axes have no names


def test_muon_state_checkpoints_and_resumes_bit_for_bit(tmp_path) -> None:
    """Two steps, a checkpoint, two more; against the same two steps from the restored checkpoint,
    on a two-device fsdp mesh (Muon's momentum is sharded like its parameter)."""
    opt = make_optimizer({**MUON, "schedule": "cosine", "warmup_steps": 1}, param_shapes(CFG, boxed=True), 4)
    steps = build_steps(CFG, opt, sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2]), seed=0)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        ids = rng.integers(0, CFG.vocab_size, size=(4, 17))
        batches.append({"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((4, 16), np.float32)})
    state = steps.init_state()
    for b in batches[:2]:
        state, _ = steps.train_step(state, b)
    checkpointer = ckpt.Checkpointer(RunDir.at(str(tmp_path / "run")), keep=2, async_save=False)
    checkpointer.save(2, state.params, state.opt_state)
    for b in batches[2:]:
        state, _ = steps.train_step(state, b)
    straight = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]

    target = steps.layout.abstract_state
    params, opt_state, data = checkpointer.restore_latest(target.params, target.opt_state)
    checkpointer.close()
    assert data["step"] == 2
    momentum = opt_state[0].inner_states["muon/lr_x1"].inner_state.inner_states["muon"].inner_state[0].mu
    assert np.any(np.asarray(momentum["h_0"]["mlp"]["c_fc"]["kernel"]))
    state = TrainState(step=jnp.asarray(2, jnp.int32), params=params, opt_state=opt_state)
    for b in batches[2:]:
        state, _ = steps.train_step(state, b)
    resumed = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
    assert len(straight) == len(resumed)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)
