"""The train state and the jitted, sharded train and eval steps of a run (`Trainer`).

Parameter shapes come from `param_shapes` alone (abstract: nothing is allocated); the
trainer derives from them the shardings of the parameters (their logical axis names through
`gptjax.sharding.RULES`), of the optimizer state (by parameter path) and of the batch, and
jits its steps with those shardings and the state donated. `lower_train_step` and
`lower_eval_step` lower them from abstract inputs alone, for ahead-of-time compilation on
devices this process cannot run on.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from gptjax import optim as optim_lib
from gptjax import sharding
from gptjax.loss import head_cross_entropy, head_eval_sums
from gptjax.model import GPT, GPTConfig
from gptjax.model.layers import head_table

BATCH_KEYS = ("inputs", "targets", "weights")
# Batches of packed examples (and of document-masked text) also carry these, int32 [rows, seq];
# evaluation batches of a mixture carry `sources`, float32 [rows, number of sources].
OPTIONAL_KEYS = ("segment_ids", "positions", "sources")


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_boxed_params(gpt: GPTConfig, rng: jax.Array) -> Any:
    """Fresh parameters, each boxed with its logical axis names (flax `LogicallyPartitioned`)."""
    return GPT(gpt).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def param_shapes(gpt: GPTConfig, boxed: bool = False) -> Any:
    """ShapeDtypeStructs of the parameters (boxed: with their logical axis names); nothing is allocated."""
    shapes = jax.eval_shape(lambda rng: init_boxed_params(gpt, rng), jax.random.PRNGKey(0))
    return shapes if boxed else nn.meta.unbox(shapes)


def train_compiler_options(gpt: GPTConfig, mesh: Mesh) -> dict[str, Any] | None:
    """XLA options for the train step.

    On CPU: the memory-optimized scheduler. XLA's default CPU scheduler runs ops as early as
    it can, which keeps their results alive longer (with `model.remat` it keeps the
    rematerialized forward ops' results as long as without remat); this one frees them
    sooner, so the step holds less temporary memory, and it is no slower for it
    (`tools/bench_train.py --option_ab KEY=VALUE` compares a step with and without an option).
    """
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return None


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Trainer:
    """The model, optimizer and mesh of a run, and its jitted, sharded functions."""

    def __init__(self, gpt: GPTConfig, optimizer: optim_lib.Optimizer, mesh: Mesh, seed: int, grad_accum: int = 1,
                 nonfinite_guard: bool = True):
        self.gpt, self.optimizer, self.mesh, self.seed, self.grad_accum = gpt, optimizer, mesh, seed, grad_accum
        self.nonfinite_guard = nonfinite_guard  # off only to measure its cost (tools/bench_train.py --guard_ab)
        self.model = GPT(gpt)
        self.tx = optimizer.tx
        boxed = param_shapes(gpt, boxed=True)
        self.param_shardings = sharding.logical_shardings(mesh, boxed)
        self.abstract_params = nn.meta.unbox(boxed)
        self.abstract_opt_state = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = sharding.match_by_path(
            self.abstract_opt_state, self.abstract_params, self.param_shardings, sharding.replicated(mesh)
        )
        self.state_shardings = TrainState(
            step=sharding.replicated(mesh), params=self.param_shardings, opt_state=self.opt_shardings
        )
        self.batch_sharding = sharding.batch_sharding(mesh, ndim=3)  # [accum, micro-batch, seq]
        self.eval_sharding = sharding.batch_sharding(mesh, ndim=2)  # [batch, seq]
        rep = sharding.replicated(mesh)
        self.train_step_fn = jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep),
            donate_argnums=(0,),
            compiler_options=train_compiler_options(gpt, mesh),
        )
        self.all_finite_fn = jax.jit(self._all_finite, in_shardings=(self.state_shardings,), out_shardings=rep)
        self.eval_step_fn = jax.jit(
            self._eval, in_shardings=(self.param_shardings, self.eval_sharding), out_shardings=(rep, rep)
        )

    # -- state -----------------------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        """The train state as ShapeDtypeStructs with their shardings (for restore and lowering)."""
        return TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.state_shardings.step),
            params=abstract(self.abstract_params, self.param_shardings),
            opt_state=abstract(self.abstract_opt_state, self.opt_shardings),
        )

    def init_state(self) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""

        def init(rng: jax.Array) -> TrainState:
            params = nn.meta.unbox(init_boxed_params(self.gpt, rng))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        # No mesh context here: flax's DenseGeneral initialises a flat kernel before reshaping
        # it, and a logical constraint on that flat value would not fit; out_shardings places
        # the results.
        return jax.jit(init, out_shardings=self.state_shardings)(jax.random.PRNGKey(self.seed))

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 state around given host parameters (an imported checkpoint)."""
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x, np.float32)[idx]),
            params,
            self.param_shardings,
        )
        with self.context():
            opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        # The step on the mesh, as the train step returns it: else the second step compiles again.
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(step=step, params=params, opt_state=opt_state)

    # -- steps -----------------------------------------------------------------------------

    def context(self) -> contextlib.ExitStack:
        """The mesh and the logical-axis rules, which the steps run (and lower) under."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def _loss_sums(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        deterministic = self.gpt.dropout == 0.0
        hidden_BxTxC = self.model.apply(
            {"params": params}, batch["inputs"], batch.get("positions"), segment_ids=batch.get("segment_ids"),
            deterministic=deterministic, rngs={"dropout": rng}, return_hidden=True,
        )
        return head_cross_entropy(
            hidden_BxTxC, head_table(self.gpt, params), batch["targets"], batch["weights"], self.gpt.vocab_size,
            self.gpt.logit_softcap, self.gpt.logits_chunk_mib * 2**20,
        )

    def _step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step over `grad_accum` micro-batches (batch arrays are [accum, micro, seq]).

        Gradients of the summed token losses are accumulated and divided by the total weight,
        so the update equals that of one big batch whatever the accumulation.
        """
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), state.step)

        def one(mb: Any, r: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
            (loss_sum, weight_sum), grads = jax.value_and_grad(self._loss_sums, has_aux=True)(state.params, mb, r)
            return grads, loss_sum, weight_sum

        if self.grad_accum == 1:
            grads, loss_sum, weight_sum = one(jax.tree_util.tree_map(lambda x: x[0], batch), rng)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)

            def body(carry: Any, xs: Any) -> tuple[Any, None]:
                g_acc, l_acc, w_acc = carry
                mb, i = xs
                g, l, w = one(mb, jax.random.fold_in(rng, i))
                return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, weight_sum), _ = jax.lax.scan(body, init, (batch, jnp.arange(self.grad_accum)))
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The non-finite guard: a step whose loss or gradient is not finite leaves parameters
        # and optimizer state as they were; the step counter still advances, so the batch of
        # every later step stays the one an uninterrupted run draws.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.nonfinite_guard:
            keep_new = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree_util.tree_map(keep_new, params, state.params)
            opt_state = jax.tree_util.tree_map(keep_new, opt_state, state.opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.optimizer.schedule(state.step),
            "skipped": 1 - finite.astype(jnp.int32),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _all_finite(self, state: TrainState) -> jax.Array:
        leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
        checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)

    def _eval(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(loss sum, weight sum) of a batch: scalars, or [S] per source when it has `sources`.

        The tied head's loss is made a sequence chunk at a time, as in training: no
        [batch, seq, vocab] logits, so evaluation needs no more memory than a train step.
        """
        hidden_BxTxC = self.model.apply(
            {"params": params}, batch["inputs"], batch.get("positions"), segment_ids=batch.get("segment_ids"),
            deterministic=True, return_hidden=True,
        )
        return head_eval_sums(
            hidden_BxTxC, head_table(self.gpt, params), batch["targets"], batch["weights"], batch.get("sources"),
            self.gpt.vocab_size, self.gpt.logit_softcap, self.gpt.logits_chunk_mib * 2**20,
        )

    def train_step(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict[str, jax.Array]]:
        """Run one step on this host's rows of the global batch ([rows, seq] numpy arrays)."""
        with self.context():
            return self.train_step_fn(state, self.to_global(batch, accum=True))

    def evaluate(self, params: Any, batches: Iterable[dict[str, np.ndarray]]) -> float:
        """Mean token loss over the given (host-local) batches."""
        return self.evaluate_sources(params, batches)[0]

    def evaluate_sources(
        self, params: Any, batches: Iterable[dict[str, np.ndarray]]
    ) -> tuple[float, list[float | None] | None]:
        """(mean token loss, each source's mean token loss) over the given (host-local) batches;
        the second is None unless the batches carry `sources`, and None for a source without weight."""
        total, count = np.zeros(()), np.zeros(())
        with self.context():
            for batch in batches:
                loss_sums, weight_sums = self.eval_step_fn(params, self.to_global(batch, accum=False))
                total, count = total + np.asarray(loss_sums, np.float64), count + np.asarray(weight_sums, np.float64)
        mean = float(total.sum() / max(float(count.sum()), 1.0))
        if total.ndim == 0:
            return mean, None
        return mean, [float(t / c) if c > 0 else None for t, c in zip(total, count)]

    def all_finite(self, state: TrainState) -> bool:
        """Whether every parameter and optimizer-state value is finite (checked before a save)."""
        with self.context():
            return bool(self.all_finite_fn(state))

    def to_global(self, batch: dict[str, np.ndarray], accum: bool) -> dict[str, jax.Array]:
        """Global arrays from this host's rows: [accum, micro, seq] for a train step, else [rows, seq]."""
        target = self.batch_sharding if accum else self.eval_sharding
        out = {}
        for key in (*BATCH_KEYS, *(k for k in OPTIONAL_KEYS if k in batch)):
            x = np.asarray(batch[key])
            if accum:
                x = x.reshape(self.grad_accum, x.shape[0] // self.grad_accum, *x.shape[1:])
                global_shape = (x.shape[0], x.shape[1] * jax.process_count(), *x.shape[2:])
            else:
                global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out[key] = jax.make_array_from_process_local_data(target, x, global_shape)
        return out

    # -- ahead of time ---------------------------------------------------------------------

    def abstract_batch(self, batch_size: int, seq_len: int, accum: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as ShapeDtypeStructs: [grad_accum, batch_size / grad_accum, seq_len]
        for a train step (accum), else [batch_size, seq_len]."""
        if accum:
            shape, target = (self.grad_accum, batch_size // self.grad_accum, seq_len), self.batch_sharding
        else:
            shape, target = (batch_size, seq_len), self.eval_sharding
        dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
        return {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=target) for k in BATCH_KEYS}

    def lower_train_step(self, batch_size: int, seq_len: int) -> jax.stages.Lowered:
        """The train step lowered from abstract inputs (`.compile()` it for the mesh's devices)."""
        with self.context():
            return self.train_step_fn.lower(self.abstract_state(), self.abstract_batch(batch_size, seq_len))

    def lower_eval_step(self, batch_size: int, seq_len: int) -> jax.stages.Lowered:
        """The eval step lowered from abstract inputs."""
        with self.context():
            params = abstract(self.abstract_params, self.param_shardings)
            return self.eval_step_fn.lower(params, self.abstract_batch(batch_size, seq_len, accum=False))
