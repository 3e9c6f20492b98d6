"""Checkpoints: an orbax CheckpointManager over a run directory's `checkpoints/`.

Each `checkpoints/<step>/` holds three items:

    params      model parameters (sharded arrays; any mesh can restore them)
    opt_state   optimizer state
    data        JSON: {"step": step, "skipped_steps": n}, the data position (the batch for
                step s depends only on (seed, s)) and the count of steps the non-finite guard
                skipped so far; checkpoints written before this format also hold `seed` and
                `batches_drawn`, which are ignored

Saves are atomic: orbax writes a step into a tmp directory and renames it to `<step>` only
once every item is complete, so a machine that dies mid-save leaves the previous checkpoints
as they were (and a tmp directory that the next save's cleanup or the user removes). A
checkpoint that fails to read anyway (files cut short by a copy or a disk error) is reported
in one line and the newest readable one is used instead (`restore_latest`, `restore_params`).

Parameters and optimizer state are separate items so that sampling restores the parameters
alone, onto whatever devices it has, without knowing the optimizer (`restore_params`; from a
local checkpoint, without orbax: `gptjax.checkpoint_read`, which calls into this module only
where orbax must read, and which this module does not import). The run's config.json, written
by `gptjax.outputs.save_config` and read by `gptjax.checkpoint_read.read_run_config`, is the
resolved config of the run (see `gptjax.run`).
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp

from gptjax import storage
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.runtime import log

ITEMS = ("params", "opt_state", "data")


class Checkpointer:
    """Save and restore (params, opt_state, data position) every N steps, keeping the last K."""

    def __init__(self, run_dir: RunDir, keep: int, async_save: bool = True):
        self.run_dir = run_dir
        self.directory = run_dir.checkpoints
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        with quiet_orbax_errors():
            self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def save(self, step: int, params: Any, opt_state: Any, skipped_steps: int = 0) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave({"step": int(step), "skipped_steps": int(skipped_steps)}),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict[str, int]]:
        """(params, opt_state, data item), onto the shardings the abstract trees carry."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        data = {"step": int(out["data"]["step"]), "skipped_steps": int(out["data"].get("skipped_steps", 0))}
        return out["params"], out["opt_state"], data

    def restore_latest(
        self, abstract_params: Any, abstract_opt_state: Any, set_aside: bool = True
    ) -> tuple[Any, Any, dict[str, int]] | None:
        """The newest checkpoint that reads (as `restore`), or None when there is none.

        Each one that fails to read is reported in one line and (`set_aside`) moved to
        `unreadable/` beside `checkpoints/`: kept for the user, out of the way of the step
        that training will save again.
        """
        restore = lambda step: self.restore(step, abstract_params, abstract_opt_state)
        found = newest_readable(self.manager, restore, self.directory, self._set_aside if set_aside else None)
        if found is not None and found[2]:
            self.manager.reload()
        return None if found is None else found[1]

    def _set_aside(self, step: int) -> str:
        parent = storage.join(posixpath.dirname(self.directory), "unreadable")
        target, n = storage.join(parent, str(step)), 1
        while storage.exists(target):
            target, n = storage.join(parent, f"{step}.{n}"), n + 1
        if jax.process_index() == 0:
            storage.move_dir(storage.join(self.directory, str(step)), target)
        return target

    def wait(self) -> None:
        """Block until the asynchronous save in flight is on disk; raises its error if it failed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def newest_readable(
    manager: ocp.CheckpointManager,
    restore: Callable[[int], Any],
    where: str,
    set_aside: Callable[[int], str] | None = None,
) -> tuple[int, Any, list[int]] | None:
    """(step, restore(step), unreadable newer steps) for the newest step that reads; None when
    there are no checkpoints. Each failure is one line on stderr (and, with `set_aside`, the
    step is moved where it returns); all failing raises UserError."""
    steps = sorted(manager.all_steps(), reverse=True)
    unreadable: list[int] = []
    for i, step in enumerate(steps):
        try:
            with quiet_orbax_errors():
                return step, restore(step), unreadable
        except Exception as e:  # any failure to read: the next older checkpoint may be whole
            unreadable.append(step)
            moved = f"; moved to {set_aside(step)}" if set_aside else ""
            nxt = f"trying checkpoint {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint to use"
            log(f"checkpoint {step} in {where} is unreadable ({describe_error(e)}){moved}; {nxt}")
    if unreadable:
        raise UserError(f"no checkpoint in {where} can be read (tried steps {', '.join(map(str, unreadable))})")
    return None


@contextlib.contextmanager
def quiet_orbax_errors() -> Iterator[None]:
    """Hold back orbax's own log lines (absl) about a damaged checkpoint: the caller reports
    the failure in one line of its own."""
    from absl import logging as absl_logging

    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


def describe_error(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_params(run_dir: RunDir, step: int | None, device: jax.Device | None = None) -> Any:
    """The parameters of checkpoint `step` of `run_dir` (None: the newest that reads), read with
    orbax onto one device (default: the default backend's first).

    Works whatever mesh the run was trained on: orbax reassembles the sharded arrays. Sampling
    reaches this through `gptjax.checkpoint_read.load_for_inference` where the direct read
    does not apply.
    """
    with quiet_orbax_errors():
        manager = ocp.CheckpointManager(
            run_dir.checkpoints,
            item_names=ITEMS,
            item_handlers={"params": ocp.StandardCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(create=False, save_interval_steps=0),
        )
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])

    def restore(s: int) -> Any:
        # The saved shapes and dtypes (the checkpoint's metadata) onto one device: no model
        # is built to learn them, which would cost more than reading a small model.
        with quiet_orbax_errors():
            saved = manager.item_metadata(s)["params"]
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), saved)
        return manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(shapes)))["params"]
    try:
        if step is None:
            found = newest_readable(manager, restore, run_dir.checkpoints)
            if found is None:
                raise UserError(f"{run_dir.root!r} has no checkpoint yet")
            return found[1]
        if step not in manager.all_steps():
            raise UserError(f"{run_dir.root!r} has no checkpoint at step {step} yet")
        try:
            return restore(step)
        except Exception as e:  # a damaged checkpoint the user asked for by name
            raise UserError(f"checkpoint {step} in {run_dir.checkpoints} is unreadable ({describe_error(e)})") from e
    finally:
        manager.close()

