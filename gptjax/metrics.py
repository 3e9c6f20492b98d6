"""Training metrics: the metrics.jsonl + TensorBoard writer, and model FLOPs utilization (MFU).

MFU is the model's training FLOPs per second (`GPTConfig.flops_per_token`) over the peak of
the mesh: configured (`train.peak_tflops`), looked up by device kind in `KNOWN_PEAK_TFLOPS`,
or, on a CPU, measured with a large matmul (`measure_matmul_flops`).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax.layout import RunDir

KNOWN_PEAK_TFLOPS = {  # dense bf16 per device, from vendor datasheets
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


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
    for name, tflops in KNOWN_PEAK_TFLOPS.items():
        if name.lower() in device.device_kind.lower():
            return tflops * 1e12 * mesh.size
    # CPU (simulated devices share the same cores): one measurement stands for the machine.
    return measure_matmul_flops()


class MetricsWriter:
    """Append metrics to the run's metrics.jsonl and TensorBoard events (process 0 only)."""

    def __init__(self, run_dir: RunDir):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.path = run_dir.metrics
        self.tb = SummaryWriter(run_dir.tensorboard)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
