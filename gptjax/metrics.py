"""Training metrics: the metrics.jsonl + TensorBoard writer, and model FLOPs utilization (MFU).
The validation metrics and their log line are `gptjax.evaluate.bpb`'s.

MFU is the model's training FLOPs per second (`GPTConfig.flops_per_token`) over the peak of
the mesh: configured (`train.peak_tflops`), looked up by device kind (`gptjax.chips.chip_of`),
or, on a CPU, measured with a large matmul (`measure_matmul_flops`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax import chips, storage
from gptjax.layout import RunDir

def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of an n x n matmul in `dtype` with fp32 accumulation (as `gptjax.model.matmul`)
    on the default device: the median of `repeats` after a warm-up."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops(configured_tflops: float, mesh: Mesh) -> float:
    """Peak FLOP/s of the mesh: configured, looked up, or measured on a CPU."""
    device = mesh.devices.flat[0]
    if configured_tflops > 0:
        return configured_tflops * 1e12 * mesh.size
    chip = chips.chip_of(device.device_kind) if device.platform != "cpu" else None
    if chip is not None:
        return chip.peak_flops * mesh.size
    # CPU (simulated devices share the same cores): one measurement stands for the machine.
    return measure_matmul_flops()


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
    `tracker` when one is given (a `gptjax.tracking.WandbSink`: its `write` and `close` are called
    with this writer's).

    A run that resumes from step `start` continues both logs from there: records after
    `start` (written by an attempt that was stopped before its next checkpoint) are dropped
    from metrics.jsonl, which is rewritten atomically, and a new TensorBoard events file
    starts with a purge at step start + 1, so TensorBoard discards the older files' events
    from that step on. Each step then appears once.

    In a bucket (a gs:// workdir) an object cannot be appended to: metrics.jsonl is kept in a
    local copy and uploaded whole every UPLOAD_EVERY_S seconds and on close; tensorboardX
    uploads its events file whole on each flush (every 120 s, and on close).
    """

    UPLOAD_EVERY_S = 60.0

    def __init__(self, run_dir: RunDir, start: int = 0, tracker: Any = None):
        self.tracker = tracker
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path, self.upload_to = run_dir.metrics, None
        if run_dir.is_url:
            self.upload_to, self.path = self.path, os.path.join(tempfile.mkdtemp(prefix="gptjax-metrics-"), "metrics.jsonl")
            if storage.exists(self.upload_to):
                storage.copy_file(self.upload_to, self.path)
            self.uploaded = time.monotonic()
        truncate_metrics(self.path, start)
        self.tb = summary_writer_class()(run_dir.tensorboard, purge_step=start + 1, filename_suffix=f".from-step-{start}")

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

    def _upload(self) -> None:
        assert self.upload_to is not None
        storage.copy_file(self.path, self.upload_to)
        self.uploaded = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            if self.tracker is not None:
                self.tracker.close()
            if self.upload_to:
                if os.path.exists(self.path):
                    self._upload()
                shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)


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
