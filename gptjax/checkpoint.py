"""Checkpoints: an orbax CheckpointManager over a run directory's `checkpoints/`.

Each `checkpoints/<step>/` holds three items:

    params      model parameters (sharded arrays; any mesh can restore them)
    opt_state   optimizer state
    data        JSON: {"step": step}, the data position (the batch for step s depends only on
                (seed, s)); checkpoints written before this format also hold `seed` and
                `batches_drawn`, which are ignored

Parameters and optimizer state are separate items so that sampling restores the parameters
alone, onto whatever devices it has, without knowing the optimizer. The run's config.json
(read and written here) is the resolved config of the run (see `gptjax.run`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from gptjax.config import ConfigDict, from_json, to_json
from gptjax.errors import UserError
from gptjax.layout import RunDir, find_run

ITEMS = ("params", "opt_state", "data")


class Checkpointer:
    """Save and restore (params, opt_state, step) every N steps, keeping the last K."""

    def __init__(self, run_dir: RunDir, keep: int, async_save: bool = True):
        self.directory = run_dir.checkpoints
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave({"step": int(step)}),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, int]:
        """(params, opt_state, data step), onto the shardings the abstract trees carry."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["opt_state"], int(out["data"]["step"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_run_config(run_dir: RunDir) -> ConfigDict | None:
    """The run's saved config.json, or None where there is none."""
    if not run_dir.exists():
        return None
    with open(run_dir.config) as f:
        return from_json(f.read())


def save_config(run_dir: RunDir, config: Any) -> None:
    """Write config.json atomically."""
    tmp = run_dir.config + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config))
    os.replace(tmp, run_dir.config)


def load_for_inference(path: str, device: jax.Device | None = None) -> tuple[ConfigDict, Any]:
    """(config, params) from a run directory or checkpoint, on one device (default: the
    default backend's first).

    Works whatever mesh the run was trained on: orbax reassembles the sharded arrays.
    """
    from gptjax.model import GPTConfig  # here to keep this module light for tools
    from gptjax.step import param_shapes

    run_dir, step = find_run(str(path))
    config = read_run_config(run_dir)
    assert config is not None
    manager = ocp.CheckpointManager(
        run_dir.checkpoints,
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(create=False, save_interval_steps=0),
    )
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise UserError(f"{run_dir.root!r} has no checkpoint{'' if step is None else f' at step {step}'} yet")
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        param_shapes(GPTConfig.from_config(config.model)),
    )
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(shapes)))["params"]
    manager.close()
    return config, params


def model_shape(model: Any) -> dict[str, Any]:
    """The fields of a model config (a GPTConfig or config.model) that fix parameter shapes."""
    keys = ("vocab_size", "n_layer", "n_head", "n_embd", "n_mlp", "block_size")
    return {k: (model[k] if hasattr(model, "keys") else getattr(model, k)) for k in keys}
