"""`python -m gptjax.aot`: compile a run's steps for a TPU slice this machine does not have.

    python -m gptjax.aot --config configs/gpt2_124m.py --topology v5e:4x4 [--config.x=y ...]

libtpu (`pip install -e ".[tpu]"`) compiles for the devices a topology name describes
(`jax.experimental.topologies`), with no TPU attached: the real train and eval steps, with the
config's mesh, shardings and batch, go through the TPU compiler, and so do the sampler's
prefill and decode loop with the parameters split by the config's mesh rules (as
`gptjax.load(path, mesh=...)` places them). The compiled programs say
what each chip would hold (`memory_analysis`: arguments, outputs, temporaries, code) and do
(`cost_analysis`: FLOPs and HBM bytes per chip). From those and the chip's published figures
(`gptjax.chips`) the tool prints, per step: memory against HBM and whether it fits, and a
roofline step time (the larger of compute time at peak bf16 FLOP/s and HBM traffic time at
peak bandwidth), the tokens/s and MFU that time implies. A train step that does not fit is
compiled again at smaller micro-batches to find the largest that fits (train.grad_accum).

Nothing runs on any device: the tool pins JAX to the CPU backend, so it also works on a TPU VM
whose chips are busy training.

The TPU compiler's cost analysis counts a loop body once. The train step's loop over
micro-batches holds nearly all of its work (the optimizer update after it is small), so its
HLO FLOPs and HBM bytes are the body's times grad_accum; the tied head's loop over sequence
chunks stays counted once, so the compute bound takes the larger of the HLO FLOPs and the
model's 6N + attention FLOPs. The decode loop's figures are likewise one decode step's. With
`model.scan_layers` the blocks are one loop too, counted as one layer, while the optimizer
update and the embeddings outside it are counted whole; no factor recovers the total, so the
train and eval steps' HLO FLOPs, HBM bytes and roofline show as n/a (memory and compile time
are exact). A roofline is a bound, not a measurement: it leaves out collectives and assumes
perfect overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax

from gptjax import config as config_lib
from gptjax.chips import TPUS, Chip
from gptjax.errors import UserError, run_cli

INSTALL_HINT = 'pip install -e ".[tpu]" (or pip install "jax[tpu]==0.10.2")'
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v6e:2x4, v4:2x2x1, v5p:2x2x2"
_HOST_BOUNDS = (2, 2, 1)  # chips per host on multi-host slices (v4, v5p, and v5e/v6e pods)


# -- topology ---------------------------------------------------------------------------------


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """The chip and the shape of a topology name ('v5e:2x2': v5e, (2, 2)); a UserError names
    the known chips and gives examples."""
    m = re.fullmatch(r"(v[0-9a-z]+):(\d+(?:x\d+){1,2})", name.strip().lower())
    if not m or m.group(1) not in TPUS:
        raise UserError(
            f"unknown TPU topology {name!r}; give CHIP:SHAPE with CHIP one of {', '.join(TPUS)}, "
            f"e.g. {TOPOLOGY_EXAMPLES}"
        )
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if any(d < 1 for d in dims):
        raise UserError(f"topology {name!r} has a zero dimension; e.g. {TOPOLOGY_EXAMPLES}")
    return TPUS[m.group(1)], dims


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> tuple[Chip, list[jax.Device]]:
    """The chip and the compile-only devices of a TPU slice, described by libtpu."""
    chip, dims = parse_topology(name)
    if not libtpu_installed():
        raise UserError(f"compiling for TPU needs libtpu, which is not installed: {INSTALL_HINT}")
    from jax.experimental import topologies

    # libtpu's lock file guards the chips of a TPU VM; compiling touches none, and another
    # process (a run in training, a second check) may hold the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims3 = dims + (1,) * (3 - len(dims))
    kwargs: dict[str, Any] = {"chips_per_host_bounds": tuple(min(d, h) for d, h in zip(dims3, _HOST_BOUNDS))}
    if chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(topology_name=f"{chip.name}:{'x'.join(map(str, dims))}", platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        if "INVALID_ARGUMENT" not in str(e):  # not a refused shape: libtpu itself failed
            raise
        first = str(e).strip().splitlines()[0]
        raise UserError(f"libtpu has no TPU topology {name!r} ({first}); e.g. {TOPOLOGY_EXAMPLES}") from None
    return chip, list(desc.devices)


# -- compiling --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the TPU compiler says about one program, per chip. `total` is its peak HBM use.

    It fits when the compiler accepted it and its total is within the chip's HBM (`hbm`, 0 when
    not known): the compiler's own limit is on part of that total, so acceptance alone is not
    enough (it accepts programs whose arguments and temporaries together exceed the chip).
    """

    name: str
    seconds: float
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    oom_used: int | None = None  # the compiler refused it: bytes it needed
    oom_limit: int | None = None  # ... of this many it could use
    hbm: int = 0  # the chip's HBM bytes
    executable: Any = dataclasses.field(default=None, compare=False, repr=False)  # when it compiled

    @property
    def total(self) -> int:
        if self.oom_used is not None:
            return self.oom_used
        return self.argument + self.output - self.alias + self.temp + self.code

    @property
    def refused(self) -> bool:
        return self.oom_used is not None

    @property
    def fits(self) -> bool:
        return not self.refused and (not self.hbm or self.total <= self.hbm)

    @property
    def limit(self) -> int:
        """The bytes a fitting program may use: the compiler's figure when it refused, else HBM."""
        return self.oom_limit or self.hbm or self.total


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)i?B?", text)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_oom(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the TPU compiler's out-of-HBM refusal, else None.

    libtpu words it "... required for HLO temporaries (20.00G) exceeds available HBM (15.75G)"
    or "Used 20.00G of 15.75G hbm"; sizes are binary (G = GiB).
    """
    size = r"([\d.]+[KMGT]?)i?B?"
    for pattern in (rf"required for [^()]*\({size}\) exceeds available HBM \({size}\)", rf"Used {size} of {size} hbm"):
        m = re.search(pattern, message)
        if m:
            return _parse_size(m.group(1)), _parse_size(m.group(2))
    return None


def compile_lowered(name: str, lowered: jax.stages.Lowered, hbm: int = 0) -> Compiled:
    """Compile for the lowered program's devices (chips of `hbm` bytes); an out-of-HBM refusal
    becomes a result."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        return Compiled(name, time.perf_counter() - start, oom_used=oom[0], oom_limit=oom[1], hbm=hbm)
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(
        name,
        seconds,
        argument=mem.argument_size_in_bytes,
        output=mem.output_size_in_bytes,
        alias=mem.alias_size_in_bytes,
        temp=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        hbm=hbm,
        executable=compiled,
    )


# -- the run's programs: the one place that knows the trainer's API --------------------------


def resolve_run(config: config_lib.ConfigDict, devices: Sequence[jax.Device], grad_accum: int | None = None) -> Any:
    """The run (`gptjax.run.Run`) resolved on `devices` without a workdir; `grad_accum` overrides
    train.grad_accum. The vocabulary is model.vocab_size, else tokenizer.vocab_size."""
    from gptjax import run as run_lib

    if grad_accum is not None:
        config = config.copy_and_resolve_references()
        config_lib.apply_overrides(config, [("train.grad_accum", str(grad_accum))])
    return run_lib.resolve(config, None, devices)


def unrolled_cost(
    config: config_lib.ConfigDict, devices: Sequence[jax.Device], grad_accum: int, program: str, hbm: int
) -> tuple[float, float] | None:
    """HLO (FLOPs, HBM bytes) per micro-batch of `program` ('train' or 'eval') with its blocks
    unrolled, for a model that scans them (XLA counts a scan's body once): the blocks are alike,
    so the cost of n layers is c(1) + (n - 1) * (c(2) - c(1)), from 1- and 2-layer compiles of
    the same step. None when either is refused."""
    costs = []
    for layers in (1, 2):
        shallow = config.copy_and_resolve_references()
        config_lib.apply_overrides(shallow, [("model.n_layer", str(layers)), ("model.scan_layers", "false")])
        run = resolve_run(shallow, devices, grad_accum)
        _log(f"  compiling the {program} step with {layers} unrolled layer(s) for its cost ...")
        compiled = compile_lowered(program, lower_train(run) if program == "train" else lower_eval(run), hbm)
        if compiled.refused:
            return None
        costs.append((compiled.flops, compiled.bytes_accessed))
    n = config.model.n_layer
    (f1, b1), (f2, b2) = costs
    return f1 + (n - 1) * (f2 - f1), b1 + (n - 1) * (b2 - b1)


def lower_train(run: Any) -> jax.stages.Lowered:
    return run.trainer.lower_train_step(run.train.batch_size, run.train.seq_len)


def lower_eval(run: Any) -> jax.stages.Lowered:
    """The eval step at the batch training evaluates with: one micro-batch."""
    return run.trainer.lower_eval_step(run.train.batch_size // run.train.grad_accum, run.train.seq_len)


def sampler_params(run: Any) -> Any:
    """The sampler's (decode-layout) parameters as ShapeDtypeStructs with the shardings the
    compiler gives them when `to_decode_layout` converts parameters sharded by the run's mesh
    rules, as `gptjax.load(path, mesh=...)` places them."""
    from gptjax.model import to_decode_layout
    from gptjax.step import abstract

    lowered = to_decode_layout.lower(run.model, abstract(run.trainer.abstract_params, run.trainer.param_shardings))
    return with_shardings(lowered.out_info, lowered.compile().output_shardings)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` carrying `shardings` (trees of the same structure)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def lower_sampler(run: Any, rows: int, prompt_len: int) -> tuple[jax.stages.Lowered, Callable[[Any], jax.stages.Lowered]]:
    """The sampler's first prefill (`rows` prompts of `prompt_len` tokens, new tokens up to
    the window) lowered, and a function from that prefill's executable (None: it did not
    compile) to the decode loop that follows it, lowered; prompts and controls replicated."""
    from gptjax import sharding
    from gptjax.sampling import decode

    params, placement = sampler_params(run), sharding.replicated(run.mesh)
    new = run.model.block_size - prompt_len
    prefill = decode.lower_prefill(run.model, params, rows, prompt_len, new, placement)

    def decode_loop(executable: Any) -> jax.stages.Lowered:
        out = prefill.out_info
        shardings = executable.output_shardings if executable is not None else jax.tree_util.tree_map(lambda _: placement, out)
        return decode.lower_decode(run.model, params, with_shardings(out, shardings), rows, prompt_len, new, placement)

    return prefill, decode_loop


def state_bytes(run: Any) -> tuple[int, int]:
    """Per-chip bytes of (parameters, optimizer state), from their shardings (no padding)."""
    state = run.trainer.abstract_state()
    return per_chip_bytes(state.params), per_chip_bytes(state.opt_state)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


# -- the largest micro-batch that fits ----------------------------------------------------------


def micro_batches(batch_size: int, data_parallel: int) -> list[int]:
    """Micro-batches a step of `batch_size` sequences splits into (batch_size / grad_accum,
    divisible by the data-parallel size), largest first."""
    return [batch_size // a for a in range(1, batch_size + 1) if batch_size % a == 0 and (batch_size // a) % data_parallel == 0]


def largest_fitting(
    candidates: Sequence[int], refused: dict[int, Compiled], fixed: int, compile_at: Callable[[int], Compiled]
) -> tuple[int, Compiled] | None:
    """The largest candidate micro-batch whose train step fits (`Compiled.fits`), or None.

    `refused` maps micro-batches already refused to their refusals; `fixed` is the
    part of a step's memory that does not grow with the micro-batch (its state). Each probe is
    the largest untried candidate that a straight line through the nearest known points says
    fits; the search ends when the best accepted candidate and the smallest refused one are
    neighbours, so the answer does not depend on the line being right.
    """
    bad = {m: c.total for m, c in refused.items()}
    limit = min(c.limit for c in refused.values())
    good: dict[int, Compiled] = {}
    while True:
        hi = min(bad)
        lo = max(good) if good else 0
        untried = [m for m in candidates if lo < m < hi]
        if not untried:
            break
        base_m, base_bytes = (lo, good[lo].total) if good else (0, fixed)
        slope = max(bad[hi] - base_bytes, 1) / (hi - base_m)
        guess = base_m + (limit - base_bytes) / slope
        fitting = [m for m in untried if m <= guess]
        probe = max(fitting) if fitting else min(untried)
        result = compile_at(probe)
        if result.fits:
            good[probe] = result
        else:
            bad[probe] = result.total
    if not good:
        return None
    best = max(good)
    return best, good[best]


# -- the check and its table --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """One compiled program in the table."""

    title: str
    compiled: Compiled
    shape: str  # rows x tokens it processes, as the table shows them
    tokens: int  # tokens one call processes on the whole slice
    model_flops: float  # per chip: 6N + attention per trained token, a third of that per evaluated one
    state: tuple[int, int] | None  # per-chip (parameters, optimizer state) bytes from the shardings
    repeats: int = 1  # micro-batches per call: the compiler counts the loop over them once
    scanned: bool = False  # the blocks run as one scan (model.scan_layers): its body is counted once
    unrolled: tuple[float, float] | None = None  # a scanned step's (FLOPs, HBM bytes) per micro-batch, unrolled

    @property
    def counted(self) -> bool:
        """Whether the compiler's cost figures cover the whole call (not one layer of a scan)."""
        return not self.scanned or self.unrolled is not None

    @property
    def hlo_flops(self) -> float:
        """The compiler's FLOPs per chip for the whole call (its loop body times `repeats`)."""
        return (self.unrolled[0] if self.unrolled else self.compiled.flops) * self.repeats

    @property
    def hbm_bytes(self) -> float:
        """The compiler's HBM bytes per chip for the whole call (its loop body times `repeats`)."""
        return (self.unrolled[1] if self.unrolled else self.compiled.bytes_accessed) * self.repeats


@dataclasses.dataclass(frozen=True)
class Roofline:
    seconds: float
    bound: str  # 'compute' or 'HBM'
    tokens_per_s: float
    mfu: float


def roofline(column: Column, chip: Chip) -> Roofline:
    """Step time bound by peak FLOP/s and by HBM bandwidth, whichever is slower, per chip.

    The compute time uses the larger of the HLO and the model FLOPs (the compiler sees the
    head's chunk loop once); MFU is the model FLOPs over the bound's time at peak.
    """
    compute = max(column.hlo_flops, column.model_flops) / chip.peak_flops
    memory = column.hbm_bytes / chip.hbm_bytes_per_s
    seconds = max(compute, memory, 1e-12)
    return Roofline(
        seconds, "compute" if compute >= memory else "HBM", column.tokens / seconds, column.model_flops / (seconds * chip.peak_flops)
    )


@dataclasses.dataclass(frozen=True)
class Report:
    """The outcome of `check`: what was compiled for which slice, and the verdict."""

    config_name: str
    topology: str
    chip: Chip
    n_devices: int
    mesh: dict[str, int]
    n_params: int
    vocab_size: int
    batch_size: int
    seq_len: int
    grad_accum: int
    columns: list[Column]
    fits: bool  # the train step as configured
    fitting_micro_batch: int | None  # from the search, when it did not fit
    searched: bool = True  # whether a micro-batch that fits was searched for


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


PROGRAMS = ("train", "eval", "prefill", "decode")


def check(
    config: config_lib.ConfigDict,
    topology: str,
    programs: Sequence[str] = PROGRAMS,
    search: bool = True,
    config_name: str = "",
    sample_rows: int = 8,
    prompt_len: int = 0,
    layer_costs: bool = False,
) -> Report:
    """Compile the run's `programs` for `topology`; when the train step does not fit and
    `search`, also find (and compile) the largest micro-batch that does. With `layer_costs`, a
    model that scans its layers gets its train and eval cost figures from `unrolled_cost`.

    The sampler's programs (prefill, decode) are those of a call with `sample_rows` prompts
    of `prompt_len` tokens (0: half the window) and new tokens up to the window, its
    parameters split by the config's mesh rules."""
    chip, devices = topology_devices(topology)
    run = resolve_run(config, devices)
    gpt, t = run.model, run.train
    prompt_len = prompt_len or max(1, gpt.block_size // 2)
    if {"prefill", "decode"} & set(programs) and not (1 <= prompt_len < gpt.block_size and sample_rows >= 1):
        raise UserError(
            f"the sampler's call needs at least 1 row and a prompt of 1 to {gpt.block_size - 1} tokens (model.block_size "
            f"{gpt.block_size}), got {sample_rows} rows of {prompt_len}"
        )
    micro = t.batch_size // t.grad_accum
    n = len(devices)
    train_flops = gpt.flops_per_token(t.seq_len) / n

    def train_column(r: Any, title: str) -> Column:
        m = r.train.batch_size // r.train.grad_accum
        _log(f"compiling the train step for {topology} (micro-batch {m}, grad_accum {r.train.grad_accum}) ...")
        compiled = compile_lowered("train", lower_train(r), chip.hbm_bytes)
        _log(f"  {_outcome(compiled)}")
        tokens = r.train.batch_size * r.train.seq_len
        shape = f"{m} x {r.train.seq_len} x {r.train.grad_accum}"
        return Column(title, compiled, shape, tokens, train_flops * tokens, state_bytes(r), r.train.grad_accum, gpt.scan_layers)

    def costed(c: Column, grad_accum: int) -> Column:
        if not (layer_costs and c.scanned) or c.compiled.refused:
            return c
        return dataclasses.replace(c, unrolled=unrolled_cost(config, devices, grad_accum, c.compiled.name, chip.hbm_bytes))

    columns: list[Column] = []
    fits, found = True, None
    if "train" in programs:
        first = train_column(run, "train step")
        columns.append(costed(first, t.grad_accum))
        fits = first.compiled.fits
        if not fits and search:
            from gptjax import sharding

            candidates = micro_batches(t.batch_size, sharding.data_parallel_size(run.mesh))
            fixed = sum(first.state or (0, 0))
            tried: dict[int, Column] = {}

            def compile_at(m: int) -> Compiled:
                tried[m] = train_column(resolve_run(config, devices, grad_accum=t.batch_size // m), f"train, micro-batch {m}")
                return tried[m].compiled

            result = largest_fitting(candidates, {micro: first.compiled}, fixed, compile_at)
            if result is not None:
                found = result[0]
                columns.append(costed(tried[found], t.batch_size // found))
    if "eval" in programs:
        # Training evaluates a micro-batch at a time: the one that fits, when one was found.
        eval_run = run if found is None else resolve_run(config, devices, grad_accum=t.batch_size // found)
        rows = found or micro
        _log(f"compiling the eval step for {topology} (batch {rows}) ...")
        tokens = rows * t.seq_len
        compiled = compile_lowered("eval", lower_eval(eval_run), chip.hbm_bytes)
        _log(f"  {_outcome(compiled)}")
        column = Column("eval step", compiled, f"{rows} x {t.seq_len}", tokens, train_flops / 3 * tokens, None, scanned=gpt.scan_layers)
        columns.append(costed(column, t.batch_size // rows))
    if "prefill" in programs or "decode" in programs:
        columns += sampler_columns(run, topology, chip, programs, sample_rows, prompt_len)
    return Report(
        config_name=config_name,
        topology=topology,
        chip=chip,
        n_devices=n,
        mesh=dict(run.mesh.shape),
        n_params=gpt.num_params(),
        vocab_size=gpt.vocab_size,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum,
        columns=columns,
        fits=fits,
        fitting_micro_batch=found,
        searched=search,
    )


def sampler_columns(run: Any, topology: str, chip: Chip, programs: Sequence[str], rows: int, prompt_len: int) -> list[Column]:
    """The prefill and decode-step columns (see `check`); the decode loop is compiled with the
    prefill's output shardings, so the prefill is compiled even when only decode is asked."""
    from gptjax.sampling.decode import plan_lengths

    gpt, n = run.model, len(run.mesh.devices.flat)
    slots = plan_lengths(prompt_len, gpt.block_size - prompt_len, gpt.block_size)[1]
    forward = lambda context: gpt.flops_per_token(context) / 3 / n  # per token, per chip
    _log(f"compiling the sampler's prefill for {topology} ({rows} prompts of {prompt_len} tokens) ...")
    prefill_lowered, decode_loop = lower_sampler(run, rows, prompt_len)
    prefill = compile_lowered("prefill", prefill_lowered, chip.hbm_bytes)
    _log(f"  {_outcome(prefill)}")
    columns = []
    if "prefill" in programs:
        columns.append(Column("prefill", prefill, f"{rows} x {prompt_len}", rows * prompt_len,
                              forward(prompt_len) * rows * prompt_len, None))
    if "decode" in programs:
        _log(f"compiling the sampler's decode step for {topology} ({rows} rows, {slots} cache slots) ...")
        step = compile_lowered("decode", decode_loop(prefill.executable), chip.hbm_bytes)
        _log(f"  {_outcome(step)}")
        columns.append(Column("decode step", step, f"{rows} x 1 (cache {slots})", rows, forward(slots) * rows, None))
    return columns


def _outcome(c: Compiled) -> str:
    if c.fits:
        return f"fits: {_bytes(c.total)} per chip ({c.seconds:.0f} s)"
    return f"does not fit: needs {_bytes(c.total)} of {_bytes(c.limit)} ({c.seconds:.0f} s)"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_report(report: Report) -> str:
    """The table `python -m gptjax.aot` prints."""
    chip = report.chip
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    lines = [
        f"{report.config_name or 'config'} on {report.topology}: {report.n_devices} x {chip.device_kind} "
        f"({chip.hbm_gib:g} GiB HBM, {chip.bf16_tflops:g} TFLOP/s bf16, {chip.hbm_gbps:g} GB/s per chip)",
        f"model {report.n_params / 1e6:.1f}M parameters (vocabulary {report.vocab_size}); mesh {mesh}; "
        f"batch {report.batch_size} x {report.seq_len} tokens, grad_accum {report.grad_accum}",
        "",
    ]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell: Callable[[Column], str]) -> None:
        rows.append((label, [cell(c) for c in report.columns]))

    def ok(cell: Callable[[Column], str]) -> Callable[[Column], str]:
        return lambda c: "-" if c.compiled.refused else cell(c)

    def counted(cell: Callable[[Column], str]) -> Callable[[Column], str]:
        """A cell from the compiler's cost analysis: not shown where it counts one layer of n."""
        return ok(lambda c: cell(c) if c.counted else "n/a (scan_layers; --layer_costs)")

    row("rows x tokens x micro-batches", lambda c: c.shape)
    row("parameters (shardings)", lambda c: _bytes(c.state[0]) if c.state else "-")
    row("optimizer state (shardings)", lambda c: _bytes(c.state[1]) if c.state else "-")
    row("arguments", ok(lambda c: _bytes(c.compiled.argument)))
    row("outputs not aliased to them", ok(lambda c: _bytes(c.compiled.output - c.compiled.alias)))
    row("temporaries", ok(lambda c: _bytes(c.compiled.temp)))
    row("generated code", ok(lambda c: _bytes(c.compiled.code)))
    row("total per chip", lambda c: _bytes(c.compiled.total))
    row(f"of HBM ({chip.hbm_gib:g} GiB)", lambda c: f"{100 * c.compiled.total / chip.hbm_bytes:.0f}%")
    row(
        "fits",
        lambda c: "yes"
        if c.compiled.fits
        else f"no (compiler: {_bytes(c.compiled.limit)} usable)"
        if c.compiled.refused
        else f"no (over the chip's {chip.hbm_gib:g} GiB)",
    )
    row("HLO FLOPs per chip", counted(lambda c: f"{c.hlo_flops:.3g}"))
    row("model FLOPs per chip (6N + attention)", lambda c: f"{c.model_flops:.3g}")
    row("HLO HBM bytes per chip", counted(lambda c: _bytes(c.hbm_bytes)))
    row("roofline time per call", counted(lambda c: f"{_seconds(roofline(c, chip).seconds)} ({roofline(c, chip).bound}-bound)"))
    row("roofline tokens/s (slice)", counted(lambda c: f"{roofline(c, chip).tokens_per_s:,.0f}"))
    row("MFU at roofline time", counted(lambda c: f"{100 * roofline(c, chip).mfu:.0f}%"))
    row("compile time", lambda c: f"{c.compiled.seconds:.0f} s")

    width = max(len(label) for label, _ in rows)
    cols = [max(len(c.title), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(report.columns)]
    lines.append(" " * width + "  " + "  ".join(c.title.rjust(w) for c, w in zip(report.columns, cols)))
    for label, cells in rows:
        lines.append(label.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(cells, cols)))
    if any(c.unrolled for c in report.columns):
        lines.append("HLO figures of scanned steps: c(1) + (n_layer - 1) * (c(2) - c(1)) from 1- and 2-layer unrolled compiles")
    lines.append("")
    if report.fits:
        lines.append("verdict: the train step fits as configured")
    elif report.fitting_micro_batch is not None:
        m = report.fitting_micro_batch
        lines.append(
            f"verdict: does not fit; the largest micro-batch that fits is {m}: "
            f"--config.train.grad_accum={report.batch_size // m}"
        )
    elif not report.searched:
        lines.append("verdict: does not fit as configured (without --no_search the tool finds the micro-batch that fits)")
    else:
        lines.append("verdict: does not fit at any micro-batch; use a larger slice, more fsdp, or a smaller model")
    return "\n".join(lines)


def _compile_only_jax() -> None:
    """Hold no accelerator: the tool runs nothing, so JAX gets the CPU backend only."""
    jax.config.update("jax_platforms", "cpu")


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns 0 when the train step fits as configured, 1 when it does not."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.aot",
        description="Compile a run's steps for a TPU slice without a TPU and say whether they fit and how fast "
        "they could run. Any config field can be set with --config.section.field=value.",
    )
    parser.add_argument("--config", default="", help="a config file with get_config() (default: the built-in CPU demo)")
    parser.add_argument("--topology", required=True, help=f"the TPU slice as CHIP:SHAPE, e.g. {TOPOLOGY_EXAMPLES}")
    parser.add_argument(
        "--programs", default=",".join(PROGRAMS), help=f"which programs to compile: {', '.join(PROGRAMS)} (comma-separated)"
    )
    parser.add_argument("--sample_rows", type=int, default=8, help="the sampler's prompts per call (prefill, decode)")
    parser.add_argument("--prompt_len", type=int, default=0, help="the sampler's prompt tokens (default: half the window)")
    parser.add_argument("--no_search", action="store_true", help="do not search for a micro-batch that fits")
    parser.add_argument(
        "--layer_costs", action="store_true",
        help="with model.scan_layers, take the train and eval HLO FLOPs and HBM bytes (and so the roofline) from "
        "1- and 2-layer unrolled compiles (XLA counts a scan's body once); two more compiles per step",
    )
    args, rest = parser.parse_known_args(argv)

    def body() -> int:
        programs = [p.strip() for p in args.programs.split(",") if p.strip()]
        unknown = sorted(set(programs) - set(PROGRAMS))
        if unknown or not programs:
            raise UserError(f"--programs takes some of {', '.join(PROGRAMS)}, got {args.programs!r}")
        _compile_only_jax()
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        report = check(
            config, args.topology, programs, search=not args.no_search, config_name=args.config,
            sample_rows=args.sample_rows, prompt_len=args.prompt_len, layer_costs=args.layer_costs,
        )
        print(format_report(report))
        return 0 if report.fits else 1

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
