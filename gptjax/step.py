"""The train and eval steps as pure functions, and `build_steps`, which jits them with a run's
shardings.

`train_step`, `eval_step`, `loss_sums` and `all_finite` are the step bodies: functions of
arrays, with the model, optimizer and settings given as keywords. `build_steps` binds those
keywords (`functools.partial`) and jits the bodies with the shardings of `gptjax.state.Layout`,
the train state donated; the `Steps` it returns runs them from host batches, and lowers them
from abstract inputs alone for ahead-of-time compilation on devices this process cannot run on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from jax.sharding import Mesh

from gptjax import optim as optim_lib
from gptjax import sharding
from gptjax.loss import head_cross_entropy, head_eval_sums
from gptjax.model import GPT, GPTConfig
from gptjax.model.layers import head_table
from gptjax.model.platform import resolve_head_loss
from gptjax.state import Layout, TrainState, abstract, init_boxed_params, make_layout

Batch = dict[str, jax.Array]


def loss_sums(gpt: GPTConfig, params: Any, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed token loss, summed weight) of one micro-batch, with dropout when the model has it."""
    hidden_BxTxC = GPT(gpt).apply(
        {"params": params}, batch["inputs"], batch.get("positions"), segment_ids=batch.get("segment_ids"),
        deterministic=gpt.dropout == 0.0, rngs={"dropout": rng}, return_hidden=True,
    )
    return head_cross_entropy(
        hidden_BxTxC, head_table(gpt, params), batch["targets"], batch["weights"], gpt.vocab_size, gpt.logit_softcap,
        gpt.logits_chunk_mib * 2**20, resolve_head_loss(gpt) == "kernel",
    )


def train_step(
    state: TrainState, batch: Batch, *, gpt: GPTConfig, tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array], seed: int, grad_accum: int, nonfinite_guard: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `grad_accum` micro-batches (batch arrays are [accum, micro, seq]).

    Gradients of the summed token losses are accumulated and divided by the total weight,
    so the update equals that of one big batch whatever the accumulation.
    """
    rng = jax.random.fold_in(jax.random.PRNGKey(seed + 1), state.step)

    def one(mb: Any, r: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        (loss_sum, weight_sum), grads = jax.value_and_grad(functools.partial(loss_sums, gpt), has_aux=True)(
            state.params, mb, r)
        return grads, loss_sum, weight_sum

    if grad_accum == 1:
        grads, loss_sum, weight_sum = one(jax.tree_util.tree_map(lambda x: x[0], batch), rng)
    else:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)

        def body(carry: Any, xs: Any) -> tuple[Any, None]:
            g_acc, l_acc, w_acc = carry
            mb, i = xs
            g, l, w = one(mb, jax.random.fold_in(rng, i))
            return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, weight_sum), _ = jax.lax.scan(body, init, (batch, jnp.arange(grad_accum)))
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The non-finite guard: a step whose loss or gradient is not finite leaves parameters
    # and optimizer state as they were; the step counter still advances, so the batch of
    # every later step stays the one an uninterrupted run draws.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nonfinite_guard:
        keep_new = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree_util.tree_map(keep_new, params, state.params)
        opt_state = jax.tree_util.tree_map(keep_new, opt_state, state.opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "skipped": 1 - finite.astype(jnp.int32)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def all_finite(state: TrainState) -> jax.Array:
    """Whether every parameter and optimizer-state value is finite (checked before a save)."""
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def eval_step(params: Any, batch: Batch, *, gpt: GPTConfig) -> tuple[jax.Array, jax.Array]:
    """(loss sum, weight sum) of a batch: scalars, or [S] per source when it has `sources`.

    The tied head's loss is made a sequence chunk at a time, as in training: no
    [batch, seq, vocab] logits, so evaluation needs no more memory than a train step.
    """
    hidden_BxTxC = GPT(gpt).apply(
        {"params": params}, batch["inputs"], batch.get("positions"), segment_ids=batch.get("segment_ids"),
        deterministic=True, return_hidden=True,
    )
    return head_eval_sums(
        hidden_BxTxC, head_table(gpt, params), batch["targets"], batch["weights"], batch.get("sources"),
        gpt.vocab_size, gpt.logit_softcap, gpt.logits_chunk_mib * 2**20, resolve_head_loss(gpt) == "kernel",
    )


# The TPU compiler's size (MiB) above which a sharded matmul becomes a windowed einsum; one this
# large turns them off (as MaxText's DISABLE_COLLECTIVE_MATMUL does).
NO_WINDOWED_EINSUM = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1_000_000}


def train_compiler_options(mesh: Mesh, gpt: GPTConfig | None = None) -> dict[str, Any] | None:
    """XLA options for the train step.

    On CPU: the memory-optimized scheduler. XLA's default CPU scheduler runs ops as early as
    it can, which keeps their results alive longer (with `model.remat` it keeps the
    rematerialized forward ops' results as long as without remat); this one frees them
    sooner, so the step holds less temporary memory, and it is no slower for it
    (`tools/bench_train.py --option_ab KEY=VALUE` compares a step with and without an option).
    On TPU with `model.collective_matmul=False`: no windowed einsums (`NO_WINDOWED_EINSUM`).
    """
    platform = mesh.devices.flat[0].platform
    if platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    if platform == "tpu" and gpt is not None and not gpt.collective_matmul:
        return dict(NO_WINDOWED_EINSUM)
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class Steps:
    """A run's steps, jitted with its shardings (`build_steps`), and how the host calls them."""

    gpt: GPTConfig
    tx: optax.GradientTransformation
    seed: int
    layout: Layout
    train_jit: Any  # train_step: (state, global batch) -> (state, metrics); the state is donated
    eval_jit: Any  # eval_step: (params, global batch) -> (loss sums, weight sums)
    all_finite_jit: Any  # all_finite: state -> bool array

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""

        def init(rng: jax.Array) -> TrainState:
            params = nn.meta.unbox(init_boxed_params(self.gpt, rng))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        # No mesh context here: flax's DenseGeneral initialises a flat kernel before reshaping
        # it, and a logical constraint on that flat value would not fit; out_shardings places
        # the results.
        return jax.jit(init, out_shardings=self.layout.state)(jax.random.PRNGKey(self.seed))

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 state around given host parameters (an imported checkpoint)."""
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x, np.float32)[idx]),
            params,
            self.layout.params,
        )
        with self.layout.context():
            opt_state = jax.jit(self.tx.init, out_shardings=self.layout.state.opt_state)(params)
        # The step on the mesh, as the train step returns it: else the second step compiles again.
        step = jax.device_put(jnp.zeros((), jnp.int32), self.layout.state.step)
        return TrainState(step=step, params=params, opt_state=opt_state)

    def train_step(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict[str, jax.Array]]:
        """Run one step on this host's rows of the global batch ([rows, seq] numpy arrays)."""
        with self.layout.context():
            return self.train_jit(state, self.layout.to_global(batch, accum=True))

    def evaluate(self, params: Any, batches: Iterable[dict[str, np.ndarray]]) -> float:
        """Mean token loss over the given (host-local) batches."""
        return self.evaluate_sources(params, batches)[0]

    def evaluate_sources(
        self, params: Any, batches: Iterable[dict[str, np.ndarray]]
    ) -> tuple[float, list[float | None] | None]:
        """(mean token loss, each source's mean token loss) over the given (host-local) batches;
        the second is None unless the batches carry `sources`, and None for a source without weight."""
        total, count = np.zeros(()), np.zeros(())
        with self.layout.context():
            for batch in batches:
                loss_sums, weight_sums = self.eval_jit(params, self.layout.to_global(batch, accum=False))
                total, count = total + np.asarray(loss_sums, np.float64), count + np.asarray(weight_sums, np.float64)
        mean = float(total.sum() / max(float(count.sum()), 1.0))
        if total.ndim == 0:
            return mean, None
        return mean, [float(t / c) if c > 0 else None for t, c in zip(total, count)]

    def all_finite(self, state: TrainState) -> bool:
        """Whether every parameter and optimizer-state value is finite (checked before a save)."""
        with self.layout.context():
            return bool(self.all_finite_jit(state))

    def lower_train_step(self, batch_size: int, seq_len: int) -> jax.stages.Lowered:
        """The train step lowered from abstract inputs (`.compile()` it for the mesh's devices)."""
        with self.layout.context():
            return self.train_jit.lower(self.layout.abstract_state, self.layout.abstract_batch(batch_size, seq_len))

    def lower_eval_step(self, batch_size: int, seq_len: int) -> jax.stages.Lowered:
        """The eval step lowered from abstract inputs."""
        with self.layout.context():
            params = abstract(self.layout.abstract_params, self.layout.params)
            return self.eval_jit.lower(params, self.layout.abstract_batch(batch_size, seq_len, accum=False))


def build_steps(
    gpt: GPTConfig, optimizer: optim_lib.Optimizer, mesh: Mesh, seed: int, grad_accum: int = 1,
    nonfinite_guard: bool = True,
) -> Steps:
    """The steps of `gpt` trained by `optimizer` on `mesh`, jitted with the state's layout.

    `seed` draws the initial parameters and (plus one) the dropout keys; `nonfinite_guard` is
    off only to measure its cost (`tools/bench_train.py --guard_ab`)."""
    options = train_compiler_options(mesh, gpt)
    layout = make_layout(gpt, optimizer.tx, mesh, grad_accum)
    rep = sharding.replicated(mesh)
    train = functools.partial(
        train_step, gpt=gpt, tx=optimizer.tx, schedule=optimizer.schedule, seed=seed, grad_accum=grad_accum,
        nonfinite_guard=nonfinite_guard,
    )
    return Steps(
        gpt=gpt,
        tx=optimizer.tx,
        seed=seed,
        layout=layout,
        train_jit=jax.jit(
            train,
            in_shardings=(layout.state, layout.batch),
            out_shardings=(layout.state, rep),
            donate_argnums=(0,),
            compiler_options=options,
        ),
        eval_jit=jax.jit(
            functools.partial(eval_step, gpt=gpt), in_shardings=(layout.params, layout.eval_batch), out_shardings=(rep, rep)
        ),
        all_finite_jit=jax.jit(all_finite, in_shardings=(layout.state,), out_shardings=rep),
    )
