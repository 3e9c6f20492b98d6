"""Muon for the hidden matrices (`optim.hidden = "muon"`): which parameters it takes, how each
kernel is seen as a matrix, and its optax transformation.

Muon (Jordan et al., modded-nanogpt; `optax.contrib.muon`) replaces each update of a weight
matrix by the orthogonalized (Newton-Schulz) Nesterov momentum of its gradients, scaled by
sqrt(max(1, fan_out / fan_in)). It is defined for matrices that map one hidden vector to
another, so it takes only the kernels inside the blocks (`h_i/.../kernel`, rank >= 2); the
embeddings, an output head, norms and biases keep AdamW (`gptjax.optim` builds both per label).

The kernels keep their natural axes (`[embed, qkv, heads, head_dim]` for the fused query/key/
value projection, `[heads, head_dim, embed]` for the attention output), so each one is turned
into a matrix by its logical axis names (`optax.contrib.MuonDimensionNumbers`):
  - a stacking axis (`STACK_AXES`: the query/key/value axis of `c_attn` and of grouped-query
    attention's `kv_proj`) is a batch axis: each of the query, key and value matrices is
    orthogonalized on its own;
  - a kernel that reads the residual stream (first axis `embed`) reduces over it and outputs
    the other axes; one that writes it (last axis `embed`) outputs it and reduces over the rest;
  - any other kernel reduces over its first axis and outputs the rest (flax's [in, out]).
A rank-2 kernel without names is [in, out]; a higher-rank one needs its names (build the
optimizer from boxed parameter shapes, as `gptjax.run` does).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import optax
from optax.contrib import MuonDimensionNumbers

from gptjax.schema import OptimConfig

STACK_AXES = ("qkv",)  # logical axes that stack separate matrices in one kernel (c_attn, kv_proj)
_BLOCK = re.compile(r"h_\d+")


def is_hidden_matrix(path: str, shape: tuple[int, ...]) -> bool:
    """Whether Muon takes this parameter: a kernel of rank >= 2 inside a block `h_i`."""
    parts = path.split("/")
    return bool(_BLOCK.fullmatch(parts[0])) and parts[-1] == "kernel" and len(shape) >= 2


def dimension_numbers(path: str, shape: tuple[int, ...], names: tuple[str | None, ...] | None) -> MuonDimensionNumbers:
    """How the kernel at `path` is a (batch of) matrices: see the module doc."""
    rank = len(shape)
    if names is None:
        if rank != 2:
            raise ValueError(
                f"Muon needs the logical axis names of the rank-{rank} kernel {path!r}: build the optimizer "
                "from boxed parameter shapes (gptjax.state.param_shapes(gpt, boxed=True))"
            )
        return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    batch = {i for i, n in enumerate(names) if n in STACK_AXES}
    rest = [i for i in range(rank) if i not in batch]
    if names[rest[0]] != "embed" and names[rest[-1]] == "embed":
        reduction, output = rest[:-1], rest[-1:]
    else:
        reduction, output = rest[:1], rest[1:]
    if not reduction or not output:
        raise ValueError(f"Muon: the kernel {path!r} with axes {names} is not a matrix")
    return MuonDimensionNumbers(reduction_axis=tuple(reduction), output_axis=tuple(output))


def muon(cfg: OptimConfig, learning_rate: Callable[[Any], Any], decay: bool,
         dims: Mapping[str, MuonDimensionNumbers]) -> optax.GradientTransformation:
    """`optax.contrib.muon` for one label's hidden matrices, with `cfg`'s momentum and (if
    `decay`) weight decay. `dims` maps each parameter path it may meet to its dimension
    numbers, keyed by `jax.tree_util.keystr` of its key path; the label's other leaves are
    `MaskedNode`s and stay so."""

    def dim_nums(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, _: dims[jax.tree_util.keystr(p)], tree)

    return optax.contrib.muon(
        learning_rate,
        beta=cfg.muon_momentum,
        weight_decay=cfg.muon_weight_decay if decay else 0.0,
        nesterov=True,
        muon_weight_dimension_numbers=dim_nums,
    )
