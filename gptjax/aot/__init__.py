"""`python -m gptjax.aot`: compile a run's steps for a TPU slice this machine does not have.

    python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:4x4 [--config.x=y ...]

libtpu (`pip install -e ".[tpu]"`) compiles for the devices a topology name describes
(`jax.experimental.topologies`), with no TPU attached: the real train and eval steps, with the
config's mesh, shardings and batch, go through the TPU compiler, and so do the sampler's
prefill and decode loop with the parameters split by the config's mesh rules (as
`gptjax.load(path, mesh=...)` places them). The compiled programs say
what each chip would hold (`memory_analysis`: arguments, outputs, temporaries, code) and do
(`cost_analysis`: FLOPs and HBM bytes per chip, which `gptjax.aot.counts` completes with every
loop iteration, the Pallas kernels' work and the collectives' ICI bytes). From those and the
chip's published figures (`gptjax.chips`) the tool prints, per step: memory against HBM and
whether it fits, and a roofline step time (the slowest of compute time at peak bf16 FLOP/s,
HBM traffic time at peak bandwidth and collective traffic time at ICI bandwidth), the
tokens/s and MFU that time implies. A train step that does not fit is
compiled again at smaller micro-batches to find the largest that fits (train.grad_accum).
How the compiler counts loops, and so what the roofline can and cannot say, is in
`gptjax.aot.roofline`.

Nothing runs on any device: the tool pins JAX to the CPU backend, so it also works on a TPU VM
whose chips are busy training.

The modules, in the order a check uses them:
  topology  a slice's name -> its chip and libtpu's compile-only devices
  programs  the run's train, eval and sampler programs, lowered (the trainer's API lives here)
  compile   compiling one, and what the compiler says: memory, cost, or an out-of-HBM refusal
  hlo       the compiled program's HLO text, parsed (computations, instructions, padded sizes)
  counts    its FLOPs, HBM and ICI bytes with every loop iteration and kernel counted
  search    the largest micro-batch whose train step fits
  roofline  a compiled program's counts over the whole call, and its compute / HBM / ICI bound
  check     `check`: all of the above for one run and slice -> a `Report`
  report    the `Report`, its table, and the top ops (`--top_ops`)
  cli       `python -m gptjax.aot`
"""

from gptjax.aot.check import PROGRAMS, check
from gptjax.aot.cli import main
from gptjax.aot.compile import Compiled, compile_lowered, parse_oom
from gptjax.aot.counts import Counts, Op, count
from gptjax.aot.report import Report, format_report, format_top_ops
from gptjax.aot.roofline import Column, Roofline, roofline
from gptjax.aot.search import largest_fitting, micro_batches
from gptjax.aot.topology import libtpu_installed, parse_topology, topology_devices

__all__ = [
    "PROGRAMS",
    "Column",
    "Compiled",
    "Counts",
    "Op",
    "Report",
    "Roofline",
    "check",
    "compile_lowered",
    "count",
    "format_report",
    "format_top_ops",
    "largest_fitting",
    "libtpu_installed",
    "main",
    "micro_batches",
    "parse_oom",
    "parse_topology",
    "roofline",
    "topology_devices",
]
