"""Experiment tracking: Weights & Biases as a metrics sink beside metrics.jsonl and TensorBoard.

With `wandb.enabled=True` (the `wandb` config section, `gptjax.schema.WandbConfig`) process 0
of a run starts a W&B run holding the run's config and logs every metrics line the run writes
(`gptjax.metrics.MetricsWriter` forwards them), at the run's step. The W&B run id is kept in
the workdir (`RunDir.wandb_run_id`), so a resumed run continues the same W&B run; steps a
stopped attempt logged after its last checkpoint are logged again from the checkpoint on, and
W&B, which takes each run's steps in increasing order, keeps the first values it was sent for
a step already in the run.

W&B's files go under the workdir (`<workdir>/wandb/`) unless WANDB_DIR says where, or the
workdir is a URL (then W&B's default, ./wandb). Its console capture is off: the run's own
output stays as it is. `wandb` is an optional extra (`pip install 'gptjax[wandb]'`); enabling
it without the package, or a setting W&B refuses (no login for an online run, say), is a
`UserError`: one line, exit status 2.
"""

from __future__ import annotations

import os
import secrets
import string
from typing import Any, Mapping

import jax

from gptjax import storage
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.schema import WandbConfig


MISSING = "wandb.enabled=True needs the wandb package: pip install 'gptjax[wandb]'"


class WandbSink:
    """An open W&B run: `write` logs one metrics line at its step, `close` finishes the run."""

    def __init__(self, run: Any):
        self.run = run
        self.next_step = int(getattr(run, "step", 0) or 0)  # a resumed online run's next step

    @property
    def id(self) -> str:
        return self.run.id

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if step < self.next_step:  # W&B would drop it with a warning: already in the run
            return
        self.run.log({k: float(v) for k, v in metrics.items()}, step=int(step))
        self.next_step = int(step)

    def close(self) -> None:
        self.run.finish()


def require_package(cfg: WandbConfig) -> None:
    """Refuse an enabled W&B section where the wandb package is missing (a `UserError`)."""
    import importlib.util

    if cfg.enabled and importlib.util.find_spec("wandb") is None:
        raise UserError(MISSING)


def open_wandb(cfg: WandbConfig, run_dir: RunDir, config: Mapping[str, Any]) -> WandbSink | None:
    """The W&B run of `run_dir` (new, or the one its id file names), on process 0 when enabled;
    None otherwise."""
    if not cfg.enabled or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError(MISSING) from None
    id_path = run_dir.wandb_run_id
    run_id = storage.read_text(id_path).strip() if storage.exists(id_path) else ""
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        storage.write_text(id_path, run_id + "\n")  # before the run starts: a retry resumes it
    directory = None
    if "WANDB_DIR" not in os.environ and not run_dir.is_url:
        directory = run_dir.root
    try:
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or os.path.basename(run_dir.root.rstrip("/")),
            id=run_id,
            resume="allow",
            config=dict(config),
            dir=directory,
            mode=cfg.mode or None,
            settings=wandb.Settings(console="off"),
        )
    except (wandb.errors.Error, ValueError) as e:
        raise UserError(f"Weights & Biases could not start the run (wandb section {cfg}): {_one_line(e)}") from None
    return WandbSink(run)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
