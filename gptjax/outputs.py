"""A training run's outputs in its run directory, opened together before the first step and
closed together after the last (`open_outputs`), in this order:

    files           process 0's, before anything else (`write_run_files`): config.json (the
                    resolved config), the W&B run id, metrics.jsonl's local copy in a bucket
    checkpoints/    a `gptjax.checkpoint.Checkpointer`, and the state the run starts from:
                    the newest readable checkpoint's, else init_from's parameters, else
                    fresh ones, created already sharded
    metrics         metrics.jsonl and TensorBoard continued from that state's step, and the
                    W&B run when enabled (`gptjax.metrics.open_metrics`), closed each on its own

A file that cannot be opened or written is one line naming it (`gptjax.failures.io_failure`).
The loop waits for its last save (`gptjax.loop.Saves.wait`) before they close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from gptjax import checkpoint as ckpt
from gptjax import storage
from gptjax.config import to_json
from gptjax.failures import close_quietly, io_failure
from gptjax.metrics import MetricsFiles, MetricsWriter, open_metrics
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
        files = write_run_files(r)
    except OSError as e:
        raise io_failure("preparing the run", e, run_dir.root) from e
    try:
        checkpointer = ckpt.Checkpointer(run_dir, keep=r.train.keep_checkpoints)
    except OSError as e:
        raise io_failure("creating the checkpoint directory", e, run_dir.checkpoints) from e
    try:
        # The state the run starts from: the newest readable checkpoint's, else init_from's
        # parameters, else fresh ones.
        target = r.steps.layout.abstract_state
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
            writer = open_metrics(run_dir, files, int(state.step), r.sections.wandb, r.config.to_dict())
        except OSError as e:
            raise io_failure("opening the metrics", e, run_dir.metrics) from e
        try:
            yield Outputs(state, skipped_total, checkpointer, writer)
        finally:
            writer.close()  # each sink on its own, a failure in one line
    finally:
        close_quietly(checkpointer.close)


def write_run_files(r: Run) -> MetricsFiles | None:
    """The files of run `r` that process 0 writes before the first step: config.json; the W&B
    run id, read or else a new one written before W&B starts, so that a retry resumes the same
    W&B run; and metrics.jsonl, copied to a local file when the run directory is a bucket (an
    object cannot be appended to). Where the metrics go, for `open_metrics`; None on a pod's
    other processes, which write nothing."""
    run_dir = r.run_dir
    assert run_dir is not None
    if jax.process_index() != 0:
        return None
    save_config(run_dir, r.config)
    run_id = ""
    if r.sections.wandb.enabled:
        run_id = storage.read_text(run_dir.wandb_run_id).strip() if storage.exists(run_dir.wandb_run_id) else ""
        if not run_id:
            run_id = secrets.token_hex(4)  # 8 hex digits: a W&B id (lowercase letters and digits)
            storage.write_text(run_dir.wandb_run_id, run_id + "\n")
    if not run_dir.is_url:
        return MetricsFiles(run_dir.metrics, None, run_id)
    path = os.path.join(tempfile.mkdtemp(prefix="gptjax-metrics-"), "metrics.jsonl")
    if storage.exists(run_dir.metrics):
        storage.copy_file(run_dir.metrics, path)
    return MetricsFiles(path, run_dir.metrics, run_id)


def save_config(run_dir: RunDir, config: Any) -> None:
    """Write config.json (replaced whole: `storage.write_text` is atomic)."""
    storage.write_text(run_dir.config, to_json(config))
