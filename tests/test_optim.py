"""Optimizer from config: freezing, per-layer and per-pattern learning rates, weight-decay mask,
schedule, abstract/boxed trees and bad input."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gptjax import optim
from gptjax.errors import UserError
from gptjax.schema import OptimConfig, parse
from gptjax.model import GPTConfig
from gptjax.state import init_boxed_params


def make_optimizer(cfg: Any, params: Any, total_steps: int) -> optim.Optimizer:
    """`optim.make_optimizer` of an optim section given as a dict, parsed as a run parses it."""
    return optim.make_optimizer(parse(OptimConfig, cfg, "optim"), params, total_steps)


CFG = GPTConfig(vocab_size=96, n_layer=3, n_head=2, n_embd=16, block_size=16)
# Plain updates: constant lr from step 0, no clipping, no weight decay unless a test sets it.
PLAIN = dict(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=0.0)


@jax.jit
def boxed_init(rng: jax.Array) -> Any:
    """Parameters boxed with their logical axis names, as `GPT.init` returns them."""
    return init_boxed_params(CFG, rng)


@pytest.fixture(scope="module")
def params() -> Any:
    return nn.meta.unbox(boxed_init(jax.random.PRNGKey(0)))


def flat(tree: Any) -> dict[str, Any]:
    return {optim._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_grads(params: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)


def run_steps(opt: optim.Optimizer, params: Any, grads: list[Any]) -> tuple[Any, Any]:
    state = opt.tx.init(params)
    update = jax.jit(opt.tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def first_update(opt: optim.Optimizer, params: Any, grads: Any) -> dict[str, np.ndarray]:
    updates, _ = jax.jit(opt.tx.update)(grads, opt.tx.init(params), params)
    return {k: np.asarray(v) for k, v in flat(updates).items()}


# -- freezing ---------------------------------------------------------------------------------


def test_freeze_keeps_params_exact_and_allocates_no_state(params: Any) -> None:
    opt = make_optimizer({"freeze": "h_0,wte", "lr": 1e-2, "warmup_steps": 0}, params, 100)
    new, state = run_steps(opt, params, [random_grads(params, s) for s in range(3)])
    before, after = flat(params), flat(new)
    frozen = {k for k in before if k.startswith(("h_0/", "wte/"))}
    assert frozen and all(r.trainable == (r.path not in frozen) for r in opt.describe())
    for k in before:
        if k in frozen:
            np.testing.assert_array_equal(after[k], before[k])
        else:
            assert not np.array_equal(after[k], before[k]), k

    moments = {optim._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0] if x.ndim > 0}
    assert not [k for k in moments if any(k.endswith("/" + f) for f in frozen)]
    assert len(moments) == 2 * (len(before) - len(frozen))  # mu and nu of trainable params only
    assert not [x for x in moments.values() if x.shape == before["wte/embedding"].shape]


def test_frozen_grads_do_not_count_in_the_clip_norm(params: Any) -> None:
    opt = make_optimizer({**PLAIN, "freeze": "wte", "grad_clip": 1e-3}, params, 100)
    grads = random_grads(params, 0)
    huge = dict(grads, wte={"embedding": jnp.full_like(grads["wte"]["embedding"], 1e6)})
    a, b = first_update(opt, params, grads), first_update(opt, params, huge)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.any(a["wte/embedding"])


def test_train_last_blocks_and_train_only(params: Any) -> None:
    opt = make_optimizer({"train_last_blocks": 1}, params, 100)
    expected = {k for k in flat(params) if k.startswith(("h_2/", "ln_f/"))}
    assert {r.path for r in opt.describe() if r.trainable} == expected
    opt = make_optimizer({"train_only": "ln_f/.*,wte/*"}, params, 100)
    assert {r.path for r in opt.describe() if r.trainable} == {"ln_f/scale", "ln_f/bias", "wte/embedding"}
    # The union of both, minus `freeze`.
    opt = make_optimizer({"train_only": "wte", "train_last_blocks": 1, "freeze": "h_2/mlp"}, params, 100)
    trainable = {r.path for r in opt.describe() if r.trainable}
    assert "wte/embedding" in trainable and "h_2/attn/c_attn/kernel" in trainable and "ln_f/bias" in trainable
    assert "h_2/mlp/c_fc/kernel" not in trainable and "h_1/attn/c_attn/kernel" not in trainable


def test_full_fine_tuning_at_a_small_lr(params: Any) -> None:
    opt = make_optimizer({"lr": 1e-5, "warmup_steps": 0}, params, 100)
    assert all(r.trainable and r.lr_mult == 1.0 for r in opt.describe())
    assert opt.lr_at(0) == pytest.approx(1e-5)


# -- learning-rate multipliers ----------------------------------------------------------------


def test_layer_decay_scales_each_block(params: Any) -> None:
    decay, n = 0.7, CFG.n_layer
    opt = make_optimizer({**PLAIN, "layer_decay": decay}, params, 100)
    # Adam's first step with all-ones gradients moves every parameter by lr * multiplier.
    up = first_update(opt, params, jax.tree.map(jnp.ones_like, params))
    size = {k: float(np.abs(v).mean()) for k, v in up.items()}
    top = size["ln_f/scale"]
    assert top == pytest.approx(PLAIN["lr"], rel=1e-5)
    for i in range(n):
        # block h_i is block i+1 of n: lr * decay**(n - (i+1))
        for name in ("attn/c_attn/kernel", "mlp/c_fc/bias", "ln_1/scale"):
            assert size[f"h_{i}/{name}"] / top == pytest.approx(decay ** (n - 1 - i), rel=1e-5)
        assert size[f"h_{i}/mlp/c_proj/kernel"] / size["h_0/mlp/c_proj/kernel"] == pytest.approx(decay**-i, rel=1e-5)
    assert size["wte/embedding"] / top == pytest.approx(decay**n, rel=1e-5)
    assert size["wpe/embedding"] / top == pytest.approx(decay**n, rel=1e-5)


def test_lr_rules_multiply(params: Any) -> None:
    cfg = {**PLAIN, "lr_rules": "wte=0.1, h_1/*=0.5, */c_fc/*=4", "layer_decay": 0.5}
    opt = make_optimizer(cfg, params, 100)
    mult = {r.path: r.lr_mult for r in opt.describe()}
    assert mult["wte/embedding"] == pytest.approx(0.1 * 0.5**3)
    assert mult["h_1/attn/c_proj/kernel"] == pytest.approx(0.5 * 0.5)
    assert mult["h_1/mlp/c_fc/kernel"] == pytest.approx(0.5 * 4 * 0.5)
    assert mult["h_2/mlp/c_fc/bias"] == pytest.approx(4.0)
    assert mult["ln_f/bias"] == 1.0
    up = first_update(opt, params, jax.tree.map(jnp.ones_like, params))
    for path, m in mult.items():
        assert float(np.abs(up[path]).mean()) == pytest.approx(PLAIN["lr"] * m, rel=1e-5), path


def test_zero_multiplier_freezes(params: Any) -> None:
    opt = make_optimizer({"lr_rules": "h_1=0"}, params, 100)
    assert {r.path for r in opt.describe() if not r.trainable} == {k for k in flat(params) if k.startswith("h_1/")}


# -- weight decay -----------------------------------------------------------------------------


def test_no_decay_params_do_not_shrink(params: Any) -> None:
    lr, wd = 0.1, 0.5
    opt = make_optimizer({**PLAIN, "lr": lr, "weight_decay": wd}, params, 100)
    new, _ = run_steps(opt, params, [jax.tree.map(jnp.zeros_like, params)] * 2)
    before, after = flat(params), flat(new)
    decayed = {r.path for r in opt.describe() if r.weight_decay}
    assert decayed == {k for k in before if k.endswith("/kernel")}  # default no_decay: biases, LNs, embeddings
    for k in before:
        expected = before[k] * (1 - lr * wd) ** 2 if k in decayed else before[k]
        np.testing.assert_allclose(after[k], expected, rtol=1e-6, err_msg=k)


def test_custom_no_decay_and_zero_weight_decay(params: Any) -> None:
    opt = make_optimizer({"no_decay": "*bias,*ln_*,ln_f,*/c_proj/*"}, params, 100)
    decayed = {r.path for r in opt.describe() if r.weight_decay}
    assert "wte/embedding" in decayed and "h_0/attn/c_attn/kernel" in decayed
    assert "h_0/mlp/c_proj/kernel" not in decayed
    opt = make_optimizer({"weight_decay": 0.0}, params, 100)
    assert not any(r.weight_decay for r in opt.describe())


# -- schedule ---------------------------------------------------------------------------------


def test_schedule_warmup_and_decay() -> None:
    lr, ratio, warmup, total = 1e-3, 0.1, 10, 110
    cfg = optim.OptimConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=ratio, schedule="cosine")
    s = optim.make_schedule(cfg, total)
    for step in range(warmup):
        assert float(s(step)) == pytest.approx(lr * (step + 1) / (warmup + 1), rel=1e-6)
    assert float(s(warmup)) == pytest.approx(lr, rel=1e-6)
    mid = warmup + (total - 1 - warmup) / 2
    assert float(s(mid)) == pytest.approx(lr * (ratio + (1 - ratio) / 2), rel=1e-5)
    assert float(s(total - 1)) == pytest.approx(lr * ratio, rel=1e-5)
    assert float(s(total + 50)) == pytest.approx(lr * ratio, rel=1e-5)
    assert float(jax.jit(s)(jnp.int32(total - 1))) == pytest.approx(lr * ratio, rel=1e-5)

    linear = optim.make_schedule(optim.OptimConfig(lr=lr, warmup_steps=0, min_lr_ratio=ratio, schedule="linear"), 101)
    assert [float(linear(i)) for i in (0, 50, 100)] == pytest.approx([lr, lr * 0.55, lr * ratio], rel=1e-5)
    const = optim.make_schedule(optim.OptimConfig(lr=lr, warmup_steps=3, schedule="constant"), 101)
    assert [float(const(i)) for i in (0, 3, 100)] == pytest.approx([lr / 4, lr, lr], rel=1e-6)


def test_optimizer_steps_follow_the_schedule(params: Any) -> None:
    opt = make_optimizer({**PLAIN, "schedule": "linear", "warmup_steps": 2, "layer_decay": 0.5}, params, 6)
    ones = jax.tree.map(jnp.ones_like, params)
    state, update = opt.tx.init(params), jax.jit(opt.tx.update)
    for step in range(6):
        updates, state = update(ones, state, params)
        up = flat(updates)
        assert float(jnp.abs(up["ln_f/scale"]).mean()) == pytest.approx(opt.lr_at(step), rel=1e-5)
        assert float(jnp.abs(up["h_1/ln_2/bias"]).mean()) == pytest.approx(0.5 * opt.lr_at(step), rel=1e-5)


# -- trees, table, config ---------------------------------------------------------------------


def test_abstract_and_boxed_trees(params: Any) -> None:
    cfg = {"freeze": "h_0", "layer_decay": 0.8}
    concrete = make_optimizer(cfg, params, 100)
    boxed_abstract = jax.eval_shape(boxed_init, jax.random.PRNGKey(0))
    assert isinstance(boxed_abstract["wte"]["embedding"], nn.Partitioned)
    for tree in (boxed_abstract, nn.meta.unbox(boxed_abstract)):
        opt = make_optimizer(cfg, tree, 100)
        assert opt.labels == concrete.labels and opt.describe() == concrete.describe()
    abstract_state = jax.eval_shape(opt.tx.init, nn.meta.unbox(boxed_abstract))
    state = concrete.tx.init(params)
    assert jax.tree.structure(abstract_state) == jax.tree.structure(state)
    # The labels are a prefix of a boxed tree, so the same tx also runs on boxed parameters.
    boxed = boxed_init(jax.random.PRNGKey(0))
    updates, _ = jax.jit(opt.tx.update)(jax.tree.map(jnp.ones_like, boxed), opt.tx.init(boxed), boxed)
    assert not np.any(updates["h_0"]["mlp"]["c_fc"]["kernel"].value)
    assert np.all(updates["h_1"]["mlp"]["c_fc"]["kernel"].value != 0)


def test_param_table(params: Any) -> None:
    opt = make_optimizer(ml_collections.ConfigDict({"train_last_blocks": 1, "lr": 1e-4}), params, 100)
    table = optim.format_param_table(params, opt)
    lines = table.splitlines()
    assert lines[0].split() == ["parameter", "shape", "label", "lr", "x", "decay", "trainable"]
    row = next(line for line in lines if line.startswith("h_2/attn/c_attn/kernel"))
    assert row.split() == ["h_2/attn/c_attn/kernel", "16x3x2x8", "lr_x1", "1", "yes", "yes"]
    row = next(line for line in lines if line.startswith("wte/embedding"))
    assert row.split() == ["wte/embedding", "96x16", "frozen", "0", "no", "no"]
    sizes = {k: math.prod(v.shape) for k, v in flat(params).items()}
    trainable = sum(n for k, n in sizes.items() if k.startswith(("h_2/", "ln_f/")))
    assert f"trainable: {trainable:,} parameters" in table
    assert f"frozen:    {sum(sizes.values()) - trainable:,} parameters" in table
    assert sum(sizes.values()) == CFG.num_params()


def test_defaults_match_the_base_config() -> None:
    from gptjax import config as config_lib

    assert config_lib.sections(config_lib.base_config()).optim == optim.OptimConfig()


@pytest.mark.parametrize(
    "cfg, total, message",
    [
        ({"freeze": "h_9"}, 100, "optim.freeze pattern 'h_9' matches no parameter"),
        ({"train_only": "head/*"}, 100, "optim.train_only pattern 'head/*' matches no parameter"),
        ({"lr_rules": "h_0=2,lm_head=0.5"}, 100, "optim.lr_rules pattern 'lm_head' matches no parameter"),
        ({"no_decay": "*norm*"}, 100, "optim.no_decay pattern '*norm*' matches no parameter"),
        ({"freeze": "h_(0"}, 100, "is not a valid regex"),
        ({"lr_rules": "wte=-0.5"}, 100, "negative"),
        ({"lr_rules": "wte"}, 100, "malformed"),
        ({"lr_rules": "wte=fast"}, 100, "malformed"),
        ({"lr_rules": "=2"}, 100, "malformed"),
        ({"layer_decay": 0.0}, 100, "optim.layer_decay must be in (0, 1]"),
        ({"layer_decay": 1.5}, 100, "optim.layer_decay must be in (0, 1]"),
        ({"schedule": "step"}, 100, "optim.schedule must be one of ['cosine', 'linear', 'constant']"),
        ({"lr": 0.0}, 100, "optim.lr must be a positive number"),
        ({"lr": -1e-3}, 100, "optim.lr must be a positive number"),
        ({"warmup_steps": 11}, 10, "optim.warmup_steps=11 is more than the 10 training steps"),
        ({"warmup_steps": 0}, 0, "steps must be >= 1"),
        ({"freeze": "*"}, 100, "every parameter is frozen"),
        ({"train_only": "h_0", "freeze": "h_0/*"}, 100, "every parameter is frozen"),
        ({"train_last_blocks": 4}, 100, "optim.train_last_blocks=4 but the model has 3 blocks"),
        ({"train_last_blocks": -1}, 100, "optim.train_last_blocks must be >= 0"),
        ({"b2": 1.0}, 100, "optim.b2 must be in [0, 1)"),
        ({"grad_clip": -1.0}, 100, "optim.grad_clip must be >= 0"),
        ({"lrr": 1.0}, 100, "unknown optim field(s) ['lrr']"),
    ],
)
def test_bad_input(params: Any, cfg: dict[str, Any], total: int, message: str) -> None:
    with pytest.raises(UserError) as e:
        make_optimizer(cfg, params, total)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unmatched_pattern_shows_example_paths(params: Any) -> None:
    with pytest.raises(UserError, match=r"look like h_0/attn/c_attn/bias, .*wte/embedding"):
        make_optimizer({"freeze": "blocks/0"}, params, 100)
