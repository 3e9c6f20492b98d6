"""Device mesh, logical-axis rules and multi-host start-up.

The model names every parameter axis (`vocab`, `embed`, `heads`, `mlp`, ...) and every
activation axis (`batch`, `seq`, `act_embed`). `RULES` maps those names to the mesh axes
`data`, `fsdp` and `tensor`: the batch is split over data and fsdp, parameters are split over
fsdp (ZeRO-3 style) along their width and over tensor along heads / MLP / vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import MeshConfig
from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),  # grouped-query attention's key/value heads: few (maybe 1), replicated over tensor
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("pos", None),
    ("norm", None),
    ("seq", None),
    ("act_embed", None),
)


def maybe_initialize_distributed() -> None:
    """Join a multi-host job when the environment describes one (TPU pod slices, SLURM, ...).

    On a TPU VM pod slice `jax.distributed.initialize()` finds the coordinator by itself
    (set GPTJAX_DISTRIBUTED=1); elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (several processes on one machine simulate a pod's hosts: CPU devices talk
    through gloo, jax's default CPU collectives). Hosts other than 0 then print only errors
    (`quiet_other_hosts`): a pod's log is host 0's.
    """
    if os.environ.get("GPTJAX_DISTRIBUTED", "") == "1" or "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = {}
        if "JAX_COORDINATOR_ADDRESS" in os.environ:
            kwargs = dict(
                coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                process_id=int(os.environ["JAX_PROCESS_ID"]),
            )
        jax.distributed.initialize(**kwargs)
        quiet_other_hosts()


_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
_arranged_cpu_devices: int | None = None  # set by arrange_cpu_devices for this process


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity; else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def arrange_cpu_devices(mesh: MeshConfig) -> int | None:
    """For the training CLI, before JAX's backends start: one CPU device per core, so that a
    CPU run is data parallel over its cores (a small model's step is many small operations,
    which one device does not spread over the cores as well as a batch shard per core does).

    Only when the user chose neither a device count (--xla_force_host_platform_device_count in
    XLA_FLAGS, jax_num_cpu_devices / JAX_NUM_CPU_DEVICES) nor a mesh (`mesh`, the config's
    mesh section, at its defaults), the platforms allow a CPU, the process is not one
    host of several, and the backends have not started (the count is fixed when they do).
    Returns the count arranged, or None. `default_devices` then chooses among them.
    """
    global _arranged_cpu_devices
    if _DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
        return None
    if mesh != MeshConfig():
        return None
    platforms = [p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()]
    if platforms and "cpu" not in platforms:
        return None
    if os.environ.get("GPTJAX_DISTRIBUTED", "") == "1" or "JAX_COORDINATOR_ADDRESS" in os.environ:
        return None
    cores = cpu_cores()
    if cores < 2:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # the backends have started: the device count is fixed
        return None
    _arranged_cpu_devices = cores
    return cores


def default_devices(mesh: MeshConfig, micro_batch: int) -> tuple[list[jax.Device], str]:
    """The devices a run uses when none are given, and a line saying why ('' if nothing to say).

    All devices, except in a process where `arrange_cpu_devices` made one CPU device per core
    and the mesh is the default (data parallel over everything): then the most of those
    devices whose count divides the micro-batch (at least 1), so the default run never fails
    on a batch the cores do not divide.
    """
    devices = jax.devices()
    arranged = _arranged_cpu_devices
    if arranged is None or devices[0].platform != "cpu" or mesh != MeshConfig():
        return devices, ""
    n = max(d for d in range(1, min(len(devices), arranged) + 1) if micro_batch % d == 0)
    if n == arranged:
        return devices[:n], f"CPU: {n} devices, one per core, data parallel"
    return devices[:n], (
        f"CPU: {arranged} cores; data parallel over {n} device{'s' * (n > 1)} "
        f"(the micro-batch of {micro_batch} sequences does not divide by {arranged})"
    )


def quiet_other_hosts() -> None:
    """On hosts other than 0, let only errors through: Python warnings, Python logging (jax,
    orbax's absl) and XLA's C++ log below ERROR are dropped. Host 0 is left as it is."""
    if jax.process_index() == 0:
        return
    from absl import logging as absl_logging

    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    jax.config.update("jax_logging_level", "ERROR")  # also XLA's C++ minimum log level


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
    """Resolve the configured axis sizes (one may be -1) against the device count."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise UserError(f"unknown mesh axis {sorted(unknown)}; allowed: {list(MESH_AXES)}")
    values = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if any(v == 0 or v < -1 for v in values) or values.count(-1) > 1:
        raise UserError(f"mesh sizes must be positive, with at most one -1 (the rest); got {dict(zip(MESH_AXES, values))}")
    known = math.prod(v for v in values if v != -1)
    if -1 in values:
        if n_devices % known:
            raise UserError(f"mesh sizes {dict(zip(MESH_AXES, values))} do not divide the {n_devices} devices")
        values[values.index(-1)] = n_devices // known
    if math.prod(values) != n_devices:
        raise UserError(
            f"mesh sizes {dict(zip(MESH_AXES, values))} multiply to {math.prod(values)}, but there are "
            f"{n_devices} devices; their product must equal the device count (or set one axis to -1)"
        )
    return tuple(values)  # type: ignore[return-value]


def make_mesh(sizes: MeshConfig | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `sizes` (the config's mesh section, or a mapping of its axis sizes) over `devices`."""
    if isinstance(sizes, MeshConfig):
        sizes = dataclasses.asdict(sizes)
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    # Auto axes: the compiler propagates shardings from the annotated params, batch and
    # activations (GSPMD), rather than every array carrying an explicit sharding type.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except ValueError:  # a device set make_mesh has no topology for: plain reshape
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def run_mesh(mesh: MeshConfig, micro_batch: int, devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, str]:
    """A run's mesh on `devices` (default: `default_devices`) and the line saying how they were
    chosen ('' if nothing to say). Each micro-batch must split evenly over the mesh's data axes
    and over the hosts."""
    note = ""
    if devices is None:
        devices, note = default_devices(mesh, micro_batch)
    made = make_mesh(mesh, devices)
    dp = data_parallel_size(made)
    if micro_batch % dp:
        raise UserError(
            f"the micro-batch (train.batch_size / train.grad_accum = {micro_batch}) must be divisible by the "
            f"data-parallel size data*fsdp = {dp}"
        )
    if micro_batch % jax.process_count():
        raise UserError(f"the micro-batch {micro_batch} must be divisible by the number of hosts {jax.process_count()}")
    return made, note


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def describe_mesh(mesh: Mesh) -> str:
    """The mesh's axes and devices, for a log line: "{'data': 2, 'fsdp': 1, 'tensor': 1} on 2 cpu device(s)"."""
    return f"{dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} device(s)"


def logical_shardings(mesh: Mesh, boxed_tree: Any) -> Any:
    """NamedShardings for a tree of flax `LogicallyPartitioned` values (or abstract ones)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Shard the batch axis (the first one, or the second for [accum, batch, ...])."""
    lead = (None,) * (ndim - 2)
    return NamedSharding(mesh, P(*lead, ("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def match_by_path(target_abstract: Any, params_abstract: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Shardings for a tree whose leaves mirror parameters (optimizer moments, say).

    A leaf takes the sharding of the parameter whose key path is a suffix of the leaf's key
    path and whose shape is the same; anything else (counts, scalars) gets `default`.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    shardings = jax.tree_util.tree_leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {_keys(path): (tuple(leaf.shape), s) for (path, leaf), s in zip(leaves, shardings)}

    def pick(path: Any, leaf: Any) -> NamedSharding:
        keys = _keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, target_abstract)


def _keys(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def activation_mesh_axes(mesh: jax.sharding.AbstractMesh, logical: str) -> str | tuple[str, ...] | None:
    """The mesh axes a logical activation axis is split over, by the active logical-axis rules
    (RULES when none are active), keeping only axes this mesh has."""
    rules = nn.get_logical_axis_rules() or RULES
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in axes if a in mesh.axis_names)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
