"""A training run's outputs in its run directory, opened together before the first step and
closed together after the last (`open_outputs`), in this order:

    config.json     the resolved config (`save_config`)
    checkpoints/    a `gptjax.checkpoint.Checkpointer`, and the state the run starts from:
                    the newest readable checkpoint's, else init_from's parameters, else
                    fresh ones, created already sharded
    metrics         metrics.jsonl and TensorBoard continued from that state's step, and the
                    W&B run when enabled (`gptjax.metrics.open_metrics`)

A file that cannot be opened or written is one line naming it (`gptjax.failures.io_failure`).
The loop waits for its last save (`gptjax.loop.Saves.wait`) before they close.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from gptjax import checkpoint as ckpt
from gptjax import storage
from gptjax.config import to_json
from gptjax.failures import close_quietly, io_failure
from gptjax.metrics import MetricsWriter, open_metrics
from gptjax.layout import RunDir
from gptjax.run import Run
from gptjax.state import TrainState


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The open outputs of a run, and the state it starts from."""

    state: TrainState  # restored, imported or fresh
    skipped_total: int  # steps the non-finite guard skipped before `state`
    checkpointer: ckpt.Checkpointer
    writer: MetricsWriter


@contextlib.contextmanager
def open_outputs(r: Run) -> Iterator[Outputs]:
    """The outputs of the prepared run `r`, closed when the block ends."""
    run_dir = r.run_dir
    assert run_dir is not None
    try:
        if jax.process_index() == 0:
            save_config(run_dir, r.config)
    except OSError as e:
        raise io_failure("preparing the run", e, run_dir.root) from e
    try:
        checkpointer = ckpt.Checkpointer(run_dir, keep=r.train.keep_checkpoints)
    except OSError as e:
        raise io_failure("creating the checkpoint directory", e, run_dir.checkpoints) from e
    try:
        # The state the run starts from: the newest readable checkpoint's, else init_from's
        # parameters, else fresh ones.
        target = r.steps.layout.abstract_state()
        restored = checkpointer.restore_latest(target.params, target.opt_state)
        if restored is not None:
            params, opt_state, data = restored
            step, skipped_total = jnp.asarray(data["step"], jnp.int32), data["skipped_steps"]
            state = TrainState(step=step, params=params, opt_state=opt_state)
        elif r.pretrained is not None:
            state, skipped_total = r.steps.state_from_params(r.pretrained), 0
        else:
            state, skipped_total = r.steps.init_state(), 0
        try:
            writer = open_metrics(run_dir, int(state.step), r.sections.wandb, r.config.to_dict())
        except OSError as e:
            raise io_failure("opening the metrics", e, run_dir.metrics) from e
        try:
            yield Outputs(state, skipped_total, checkpointer, writer)
        finally:
            close_quietly(writer.close)
    finally:
        close_quietly(checkpointer.close)


def save_config(run_dir: RunDir, config: Any) -> None:
    """Write config.json (replaced whole: `storage.write_text` is atomic)."""
    storage.write_text(run_dir.config, to_json(config))
