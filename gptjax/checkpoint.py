"""Checkpoints: an orbax CheckpointManager under `<workdir>/checkpoints`.

A run directory holds:

    config.json        the resolved config of the run
    tokenizer/         the tokenizer the run trains with
    checkpoints/<step>/params     model parameters (sharded arrays, any mesh can restore them)
                      /opt_state  optimizer state
                      /data       JSON: the step and the data position (seed, batches drawn)
    metrics.jsonl, tb/ metrics

Parameters and optimizer state are separate items so that sampling restores the parameters
alone, onto whatever devices it has, without knowing the optimizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gptjax.config import ConfigDict, from_json
from gptjax.errors import UserError


class Checkpointer:
    """Save and restore (params, opt_state, data position) every N steps, keeping the last K."""

    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("params", "opt_state", "data"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore onto the shardings carried by the abstract trees (ShapeDtypeStructs)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["opt_state"], dict(out["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_run_config(workdir: str) -> ConfigDict | None:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return from_json(f.read())


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds at least one saved step (read without opening a manager)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def resolve_run(path: str) -> tuple[str, int | None]:
    """(workdir, step) for a run directory or one of its checkpoint step directories."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and os.path.isfile(os.path.join(os.path.dirname(parent), "config.json")):
        name = os.path.basename(path)
        if name.isdigit():
            return os.path.dirname(parent), int(name)
    raise UserError(
        f"{path!r} is not a gptjax run or checkpoint (expected a workdir with config.json, "
        f"or <workdir>/checkpoints/<step>)"
    )


def load_for_inference(path: str, device: jax.Device | None = None) -> tuple[ConfigDict, Any]:
    """(config, params) from a run directory or checkpoint, on one device (the CPU by default).

    Works whatever mesh the run was trained on: orbax reassembles the sharded arrays.
    """
    from gptjax.model import GPT, GPTConfig  # here to keep this module light for tools

    workdir, step = resolve_run(path)
    config = read_run_config(workdir)
    assert config is not None
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        item_names=("params", "opt_state", "data"),
        options=ocp.CheckpointManagerOptions(create=False, save_interval_steps=0),
    )
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise UserError(f"{workdir!r} has no checkpoint{'' if step is None else f' at step {step}'} yet")
    cfg = GPTConfig.from_config(config.model)
    device = device or jax.devices("cpu")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    shapes = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        nn.meta.unbox(shapes),
    )
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(shapes)))["params"]
    manager.close()
    return config, params


def save_config(workdir: str, text: str) -> None:
    """Write config.json atomically."""
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, "config.json"))


def model_shape(config: ConfigDict) -> dict[str, Any]:
    """The fields of config.model that fix parameter shapes."""
    keys = ("vocab_size", "n_layer", "n_head", "n_embd", "n_mlp", "block_size")
    return {k: config.model[k] for k in keys}


def describe_shape(shape: dict[str, Any]) -> str:
    return json.dumps(shape, sort_keys=True)
