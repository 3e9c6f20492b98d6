"""The accelerator chips gptjax knows: published peak bf16 FLOP/s, HBM size, HBM and ICI bandwidth.

`chip_of(device_kind)` finds a device's chip: a TPU by its exact device kind, a GPU by the
card's name within it. Training's MFU, the AOT tool's roofline and `tools/bench_gpu.py` all
read these figures from here.

One table for everything that needs a chip's figures: the ahead-of-time fit check and its
roofline (`gptjax.aot`) and the peak MFU is measured against. Figures are per chip as the
vendor publishes them; on v4 and v5p a chip's two TensorCores are one JAX device (megacore),
so per chip is per device there too.

Sources (Google Cloud TPU system architecture pages, "key chip specifications"):
  v4  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, HBM2 32 GiB, 1200 GB/s
  v5e https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, HBM2 16 GB, 819 GB/s
  v5p https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, HBM2e 95 GB, 2765 GB/s
  v6e https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, HBM 32 GB, 1638 GB/s
ICI (inter-chip interconnect) bandwidth per chip, both directions of all its links summed:
  v4  600 GB/s: six links of 400 Gb/s each way (Jouppi et al., "TPU v4: An Optically
      Reconfigurable Supercomputer...", ISCA 2023; the v4 page gives no per-chip figure)
  v5e 400 GB/s, v5p 1200 GB/s, v6e 800 GB/s: "Bidirectional inter-chip interconnect (ICI)
      bandwidth (per chip)" on the pages above (older versions give the one-way figure in
      Gbps: 1,600 for v5e, 4,800 for v5p)
VMEM per TensorCore (what a Pallas kernel's blocks must fit): jax's Pallas TPU info
(`jax.experimental.pallas.tpu.get_tpu_info`): 16 MiB on v4, 128 on v5e and v6e, 64 on v5p.
GPUs: dense bf16 TFLOP/s (without sparsity) and HBM bandwidth from NVIDIA's data sheets for
the SXM parts (H200, H100, A100) and the PCIe cards (L40S, L4, A10G).
The pages write "GB" for capacities that are binary (the chips hold 16, 95 and 32 GiB; the
TPU compiler's own limit is a little under that); the table stores GiB.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures and how JAX names it."""

    name: str  # the generation as topology names spell it: 'v5e' in 'v5e:2x2'
    device_kind: str  # jax.Device.device_kind on that chip
    bf16_tflops: float  # dense bf16 peak, TFLOP/s
    hbm_gib: float  # HBM capacity, GiB
    hbm_gbps: float  # HBM bandwidth, GB/s (1e9 bytes)
    megacore: bool = False  # two TensorCores presented as one device
    ici_gbps: float = 0.0  # ICI bandwidth, GB/s, both directions of all links summed (0: not known)
    vmem_mib: int = 0  # VMEM per TensorCore, MiB, as Pallas's TPU info gives it (0: not known)

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * 2**30)

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9

    @property
    def ici_bytes_per_s(self) -> float:
        """Bytes a chip can send per second over all its ICI links at once (half the
        bidirectional figure): the rate a collective's sent bytes are bounded by."""
        return self.ici_gbps * 1e9 / 2


TPUS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275.0, 32.0, 1200.0, megacore=True, ici_gbps=600.0, vmem_mib=16),
    "v5e": Chip("v5e", "TPU v5 lite", 197.0, 16.0, 819.0, ici_gbps=400.0, vmem_mib=128),
    "v5p": Chip("v5p", "TPU v5", 459.0, 95.0, 2765.0, megacore=True, ici_gbps=1200.0, vmem_mib=64),
    "v6e": Chip("v6e", "TPU v6 lite", 918.0, 32.0, 1638.0, ici_gbps=800.0, vmem_mib=128),
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The chip whose device kind is exactly `device_kind` ('TPU v5' is v5p, 'TPU v5 lite' v5e)."""
    for chip in TPUS.values():
        if chip.device_kind == device_kind:
            return chip
    return None


GPUS: dict[str, Chip] = {  # matched by the card's name within the device kind, in this order
    "H200": Chip("H200", "H200", 989.0, 141.0, 4800.0),
    "H100": Chip("H100", "H100", 989.0, 80.0, 3350.0),
    "A100-SXM4-80GB": Chip("A100-SXM4-80GB", "A100-SXM4-80GB", 312.0, 80.0, 2039.0),
    "A100": Chip("A100", "A100", 312.0, 40.0, 1555.0),
    "L40S": Chip("L40S", "L40S", 362.0, 48.0, 864.0),
    "L4": Chip("L4", "L4", 121.0, 24.0, 300.0),
    "A10G": Chip("A10G", "A10G", 70.0, 24.0, 600.0),
}


def chip_of(device_kind: str) -> Chip | None:
    """The chip of a device: a TPU whose device kind is exactly `device_kind`, else the first
    GPU whose name it contains ('NVIDIA H100 80GB HBM3' is the H100); None for a CPU."""
    tpu = chip_for_device_kind(device_kind)
    if tpu is not None:
        return tpu
    return next((chip for name, chip in GPUS.items() if name in device_kind), None)


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of an n x n matmul in `dtype` with fp32 accumulation (as `gptjax.model.matmul`)
    on the default device: the median of `repeats` after a warm-up."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
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
    chip = chip_of(device.device_kind) if device.platform != "cpu" else None
    if chip is not None:
        return chip.peak_flops * mesh.size
    return cpu_peak_flops()


@functools.lru_cache(maxsize=1)
def cpu_peak_flops() -> float:
    """A CPU's peak for MFU: an n=2048 fp32 matmul's FLOP/s, the median of 3, measured once per
    process (simulated devices share the same cores: one measurement stands for the machine)."""
    return measure_matmul_flops(repeats=3)
