"""The run's programs, lowered for the slice's devices: the one place that knows the train
steps' and the sampler's API.

The train step at the configured batch, the eval step at one micro-batch (as training
evaluates), and the sampler's prefill and decode loop with the parameters split by the
config's mesh rules (as `gptjax.load(path, mesh=...)` places them). What-if variants of the
run (another grad_accum, a shallow unrolled model) come from `Run.derive`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import jax

if TYPE_CHECKING:
    from gptjax.run import Run


def at_grad_accum(run: Run, grad_accum: int) -> Run:
    """The run with train.grad_accum set: the same batch split into `grad_accum` micro-batches."""
    return run.derive(train={"grad_accum": grad_accum})


def unrolled(run: Run, n_layer: int, grad_accum: int) -> Run:
    """The run's model cut to `n_layer` blocks without the layer scan, at `grad_accum`."""
    return run.derive(model={"n_layer": n_layer, "scan_layers": False}, train={"grad_accum": grad_accum})


def lower_train(run: Run) -> jax.stages.Lowered:
    """The train step at the configured batch (all its micro-batches)."""
    return run.steps.lower_train_step(run.train.batch_size, run.train.seq_len)


def lower_eval(run: Run) -> jax.stages.Lowered:
    """The eval step at the batch training evaluates with: one micro-batch."""
    return run.steps.lower_eval_step(run.train.micro_batch, run.train.seq_len)


def sampler_params(run: Run) -> Any:
    """The sampler's (decode-layout) parameters as ShapeDtypeStructs with the shardings the
    compiler gives them when `to_decode_layout` converts parameters sharded by the run's mesh
    rules, as `gptjax.load(path, mesh=...)` places them."""
    from gptjax.model import to_decode_layout
    from gptjax.state import abstract

    lowered = to_decode_layout.lower(run.model, abstract(run.steps.layout.abstract_params, run.steps.layout.params))
    return with_shardings(lowered.out_info, lowered.compile().output_shardings)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` carrying `shardings` (trees of the same structure)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def lower_sampler(run: Run, rows: int, prompt_len: int) -> tuple[jax.stages.Lowered, Callable[[Any], jax.stages.Lowered]]:
    """The sampler's first prefill (`rows` prompts of `prompt_len` tokens, new tokens up to
    the window) lowered, and a function from that prefill's executable (None: it did not
    compile) to the decode loop that follows it, lowered; prompts and controls replicated."""
    from gptjax import sharding
    from gptjax.sampling import decode

    params, placement = sampler_params(run), sharding.replicated(run.mesh)
    new = run.model.block_size - prompt_len
    prefill = decode.lower_prefill(run.model, params, rows, prompt_len, new, placement)

    def decode_loop(executable: Any) -> jax.stages.Lowered:
        out = prefill.out_info
        shardings = executable.output_shardings if executable is not None else jax.tree_util.tree_map(lambda _: placement, out)
        return decode.lower_decode(run.model, params, with_shardings(out, shardings), rows, prompt_len, new, placement)

    return prefill, decode_loop


def state_bytes(run: Run) -> tuple[int, int]:
    """Per-chip bytes of (parameters, optimizer state), from their shardings (no padding)."""
    state = run.steps.layout.abstract_state
    return per_chip_bytes(state.params), per_chip_bytes(state.opt_state)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
