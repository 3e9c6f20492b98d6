"""The train state (`TrainState`), its shapes, and where its arrays and the batches live on the
mesh (`Layout`).

Parameter shapes come from `param_shapes` alone (abstract: nothing is allocated). `make_layout`
derives from them the shardings of the parameters (their logical axis names through
`gptjax.sharding.RULES`), of the optimizer state (by parameter path) and of the batches; the
jitted steps (`gptjax.step`) are compiled with those shardings, and restore and ahead-of-time
lowering take the abstract state from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from gptjax import sharding
from gptjax.model import GPT, GPTConfig

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
    shapes = _boxed_param_shapes(gpt)
    return shapes if boxed else nn.meta.unbox(shapes)


@functools.lru_cache(maxsize=16)
def _boxed_param_shapes(gpt: GPTConfig) -> Any:
    """`param_shapes` once per model config: tracing the model's init takes seconds for the larger
    recipes (gpt2_xl: 2.5 s), and resolving a run and placing a model each ask for the shapes.
    The trees are immutable (ShapeDtypeStructs in flax boxes), so callers can share one."""
    return jax.eval_shape(lambda rng: init_boxed_params(gpt, rng), jax.random.PRNGKey(0))


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """The train state's abstract shapes and the sharding of every array a step takes."""

    mesh: Mesh
    grad_accum: int  # a train batch is [grad_accum, micro-batch, seq]
    abstract_params: Any  # ShapeDtypeStructs, unboxed
    abstract_opt_state: Any
    state: TrainState  # the sharding of each array of the state
    abstract_state: TrainState  # the state as ShapeDtypeStructs with their shardings (for restore and lowering)
    batch: NamedSharding  # a train batch [accum, micro-batch, seq]
    eval_batch: NamedSharding  # an eval batch [rows, seq]

    @property
    def params(self) -> Any:
        """The parameters' shardings."""
        return self.state.params

    def context(self) -> contextlib.ExitStack:
        """The mesh and the logical-axis rules, which the steps run (and lower) under."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def abstract_batch(self, batch_size: int, seq_len: int, accum: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as ShapeDtypeStructs: [grad_accum, batch_size / grad_accum, seq_len]
        for a train step (accum), else [batch_size, seq_len]."""
        if accum:
            shape, target = (self.grad_accum, batch_size // self.grad_accum, seq_len), self.batch
        else:
            shape, target = (batch_size, seq_len), self.eval_batch
        dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
        return {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=target) for k in BATCH_KEYS}

    def to_global(self, batch: dict[str, np.ndarray], accum: bool) -> dict[str, jax.Array]:
        """Global arrays from this host's rows: [accum, micro, seq] for a train step, else [rows, seq]."""
        target = self.batch if accum else self.eval_batch
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


def make_layout(gpt: GPTConfig, tx: optax.GradientTransformation, mesh: Mesh, grad_accum: int = 1) -> Layout:
    """The layout of the train state of `gpt` optimized by `tx` on `mesh`: parameters split by
    their logical axis names, optimizer state as its parameter, step replicated."""
    boxed = param_shapes(gpt, boxed=True)
    param_shardings = sharding.logical_shardings(mesh, boxed)
    abstract_params = nn.meta.unbox(boxed)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding.match_by_path(abstract_opt_state, abstract_params, param_shardings, sharding.replicated(mesh))
    shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings)
    return Layout(
        mesh=mesh,
        grad_accum=grad_accum,
        abstract_params=abstract_params,
        abstract_opt_state=abstract_opt_state,
        state=shardings,
        abstract_state=TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
            params=abstract(abstract_params, param_shardings),
            opt_state=abstract(abstract_opt_state, opt_shardings),
        ),
        batch=sharding.batch_sharding(mesh, ndim=3),
        eval_batch=sharding.batch_sharding(mesh, ndim=2),
    )
