"""Where a training run's metrics go: metrics.jsonl, TensorBoard events, and a Weights & Biases
run when `wandb.enabled` (the `wandb` config section, `gptjax.schema.WandbConfig`).

`open_metrics` opens them for a run that continues from a step (`gptjax.outputs` calls it once
the starting state is known, with the files it prepared: `MetricsFiles`); `MetricsWriter.write`
then sends each metrics line to every sink, and `close` closes them. Only process 0 of a pod
writes. What the lines hold is the loop's (`gptjax.loop`); MFU's peak is
`gptjax.chips.peak_flops`; the validation metrics and their log line are `gptjax.evaluate.bpb`'s.

Weights & Biases: the W&B run holds the run's config and logs every metrics line at the run's
step. Its id is kept in the workdir (`RunDir.wandb_run_id`, written before W&B starts), so a
resumed run continues the same W&B run; steps a stopped attempt logged after its last
checkpoint are logged again from the checkpoint on, and W&B, which takes each run's steps in
increasing order, keeps the first values it was sent for a step already in the run. W&B's files
go under the workdir (`<workdir>/wandb/`) unless WANDB_DIR says where, or the workdir is a URL
(then W&B's default, ./wandb). Its console capture is off: the run's own output stays as it is.
`wandb` is an optional extra (`pip install 'gptjax[wandb]'`); enabling it without the package
(refused by `gptjax.train` before any data work: `MISSING`), or a setting W&B refuses (no login
for an online run, say), is a `UserError`: one line, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Mapping

from gptjax import storage
from gptjax.errors import UserError
from gptjax.failures import close_quietly
from gptjax.layout import RunDir
from gptjax.schema import WandbConfig


@dataclasses.dataclass(frozen=True)
class MetricsFiles:
    """Where process 0 writes a run's metrics, prepared with the run's other files
    (`gptjax.outputs.write_run_files`): `path`, metrics.jsonl itself or, when the run directory
    is a bucket, a local copy that is uploaded to `upload_to` (an object cannot be appended to);
    and the id of the run's W&B run ('' without W&B)."""

    path: str
    upload_to: str | None = None
    wandb_run_id: str = ""


def open_metrics(run_dir: RunDir, files: MetricsFiles | None, start: int, wandb_cfg: WandbConfig,
                 config: Mapping[str, Any]) -> "MetricsWriter":
    """The metrics sinks of the run in `run_dir`, continuing from step `start`: metrics.jsonl and
    TensorBoard, and the W&B run of `wandb_cfg` (holding `config`) when enabled. `files` None
    (a pod's other processes): a writer that writes nothing."""
    if files is None:
        return MetricsWriter(None, run_dir.tensorboard)
    tracker = open_wandb(wandb_cfg, run_dir, config, files.wandb_run_id) if wandb_cfg.enabled else None
    try:
        return MetricsWriter(files.path, run_dir.tensorboard, start, tracker, files.upload_to)
    except BaseException:
        if tracker is not None:
            tracker.close()
        raise


def summary_writer_class() -> Any:
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors as values
    (gptjax writes floats); that import takes seconds at the start of every run on a machine
    with PyTorch. Unless torch is already loaded, it is hidden while tensorboardX loads (which
    then takes numpy arrays only) and can be imported as usual afterwards."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Append metrics to the run's metrics.jsonl and TensorBoard events (process 0 only), and to
    `tracker` when one is given (a `WandbSink`: its `write` and `close` are called
    with this writer's).

    A run that resumes from step `start` continues both logs from there: records after
    `start` (written by an attempt that was stopped before its next checkpoint) are dropped
    from metrics.jsonl, which is rewritten atomically, and a new TensorBoard events file
    starts with a purge at step start + 1, so TensorBoard discards the older files' events
    from that step on. Each step then appears once.

    In a bucket (a gs:// workdir) an object cannot be appended to: metrics.jsonl is kept in a
    local copy and this attempt's TensorBoard events file in a local directory beside it; both
    are uploaded whole (through `gptjax.storage`) every UPLOAD_EVERY_S seconds and on close.
    """

    UPLOAD_EVERY_S = 60.0

    def __init__(self, path: str | None, tensorboard: str, start: int = 0, tracker: Any = None,
                 upload_to: str | None = None):
        """Continue the local metrics.jsonl at `path` (None: write nothing, as on a pod's other
        processes) and TensorBoard events in `tensorboard` after step `start`; `upload_to`: the
        bucket object `path` is a local copy of (the events then go to a local directory too,
        uploaded to `tensorboard`)."""
        self.tracker, self.enabled, self.path, self.upload_to = tracker, path is not None, path, upload_to
        if path is None:
            return
        self.uploaded = time.monotonic()
        truncate_metrics(path, start)
        self.tensorboard, self.local_tb = tensorboard, tensorboard
        if upload_to:
            self.local_tb = os.path.join(os.path.dirname(path), "tensorboard")
        self.tb = summary_writer_class()(self.local_tb, purge_step=start + 1, filename_suffix=f".from-step-{start}")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)
        if self.tracker is not None:
            self.tracker.write(step, metrics)
        if self.upload_to and time.monotonic() - self.uploaded >= self.UPLOAD_EVERY_S:
            self._upload()

    def _upload(self, events_flushed: bool = False) -> None:
        assert self.upload_to is not None
        storage.copy_file(self.path, self.upload_to)
        if not events_flushed:
            self.tb.flush()
        for name in sorted(os.listdir(self.local_tb)):
            storage.copy_file(os.path.join(self.local_tb, name), storage.join(self.tensorboard, name))
        self.uploaded = time.monotonic()

    def close(self) -> None:
        """Close every sink. One that fails is reported in one line and the others still close:
        a TensorBoard error does not keep a bucket's metrics.jsonl from its last upload."""
        if not self.enabled:
            return
        close_quietly(self.tb.close)
        if self.tracker is not None:
            close_quietly(self.tracker.close)
        if self.upload_to:
            close_quietly(self._last_upload)

    def _last_upload(self) -> None:
        if os.path.exists(self.path):
            self._upload(events_flushed=True)  # closed (or failed to close) already
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)  # kept when the upload failed


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep only the records of metrics.jsonl at steps <= last_step (and drop a line a kill cut
    short); the file is replaced atomically, and left alone when nothing is dropped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and int(record.get("step", 0)) <= last_step:
            kept.append(line)
    if kept == lines:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def open_wandb(cfg: WandbConfig, run_dir: RunDir, config: Mapping[str, Any], run_id: str) -> WandbSink:
    """The W&B run `run_id` of `run_dir` (new, or resumed), holding `config`."""
    try:
        import wandb
    except ImportError:
        raise UserError(MISSING) from None
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
