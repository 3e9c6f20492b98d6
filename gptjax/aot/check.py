"""`check`: compile a run's programs for a TPU slice and gather the table's columns.

The run is resolved once, on the slice's compile-only devices and without a workdir; every
other program compiled (the train step at a smaller micro-batch, the eval step at the one that
fits, shallow unrolled steps for `--layer_costs`) comes from it by `Run.derive`. Progress
lines go to stderr; the table (`gptjax.aot.report`) to stdout.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

from gptjax import config as config_lib
from gptjax.aot.compile import Compiled, compile_lowered
from gptjax.aot.programs import at_grad_accum, lower_eval, lower_sampler, lower_train, state_bytes, unrolled
from gptjax.aot.report import Report, outcome
from gptjax.aot.roofline import Column
from gptjax.aot.search import largest_fitting, micro_batches
from gptjax.aot.topology import topology_devices
from gptjax.chips import Chip
from gptjax.errors import UserError
from gptjax.runtime import log

if TYPE_CHECKING:
    from gptjax.run import Run

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

    The run is resolved without a workdir: its vocabulary is model.vocab_size, else
    tokenizer.vocab_size. The sampler's programs (prefill, decode) are those of a call with
    `sample_rows` prompts of `prompt_len` tokens (0: half the window) and new tokens up to the
    window, its parameters split by the config's mesh rules."""
    from gptjax import run as run_lib

    chip, devices = topology_devices(topology)
    run = run_lib.resolve(config, None, devices)
    gpt, t = run.model, run.train
    prompt_len = prompt_len or max(1, gpt.block_size // 2)
    if {"prefill", "decode"} & set(programs) and not (1 <= prompt_len < gpt.block_size and sample_rows >= 1):
        raise UserError(
            f"the sampler's call needs at least 1 row and a prompt of 1 to {gpt.block_size - 1} tokens (model.block_size "
            f"{gpt.block_size}), got {sample_rows} rows of {prompt_len}"
        )
    columns: list[Column] = []
    fits, fitting = True, None
    if "train" in programs:
        first = train_column(run, "train step", topology, chip)
        columns.append(costed(first, run, chip, layer_costs))
        fits = first.compiled.fits
        if not fits and search:
            fitting = fitting_train_column(run, first, topology, chip)
            if fitting is not None:
                columns.append(costed(fitting[1], fitting[0], chip, layer_costs))
    if "eval" in programs:
        # Training evaluates a micro-batch at a time: the one that fits, when one was found.
        eval_run = run if fitting is None else fitting[0]
        columns.append(costed(eval_column(eval_run, topology, chip), eval_run, chip, layer_costs))
    if "prefill" in programs or "decode" in programs:
        columns += sampler_columns(run, topology, chip, programs, sample_rows, prompt_len)
    return Report(
        config_name=config_name,
        topology=topology,
        chip=chip,
        n_devices=len(devices),
        mesh=dict(run.mesh.shape),
        n_params=gpt.num_params(),
        vocab_size=gpt.vocab_size,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        grad_accum=t.grad_accum,
        columns=columns,
        fits=fits,
        fitting_micro_batch=None if fitting is None else fitting[0].train.micro_batch,
        searched=search,
    )


def train_flops_per_token(run: Run) -> float:
    """Model FLOPs (6N + attention) per trained token, per chip."""
    return run.model.flops_per_token(run.train.seq_len) / run.mesh.size


def train_column(run: Run, title: str, topology: str, chip: Chip) -> Column:
    """The train step as `run` configures it, compiled."""
    t = run.train
    log(f"compiling the train step for {topology} (micro-batch {t.micro_batch}, grad_accum {t.grad_accum}) ...")
    compiled = compile_lowered("train", lower_train(run), chip.hbm_bytes)
    log(f"  {outcome(compiled)}")
    tokens = t.batch_size * t.seq_len
    shape = f"{t.micro_batch} x {t.seq_len} x {t.grad_accum}"
    flops = train_flops_per_token(run) * tokens
    return Column(title, compiled, shape, tokens, flops, state_bytes(run), t.grad_accum, run.model.scan_layers)


def fitting_train_column(run: Run, first: Column, topology: str, chip: Chip) -> tuple[Run, Column] | None:
    """The run at the largest micro-batch whose train step fits, and that step's column; None
    when none fits. `first` is the train step as configured, which did not fit."""
    from gptjax import sharding

    t = run.train
    candidates = micro_batches(t.batch_size, sharding.data_parallel_size(run.mesh))
    tried: dict[int, tuple[Run, Column]] = {}

    def compile_at(m: int) -> Compiled:
        at_m = at_grad_accum(run, t.batch_size // m)
        tried[m] = at_m, train_column(at_m, f"train, micro-batch {m}", topology, chip)
        return tried[m][1].compiled

    result = largest_fitting(candidates, {t.micro_batch: first.compiled}, sum(first.state or (0, 0)), compile_at)
    return None if result is None else tried[result[0]]


def eval_column(run: Run, topology: str, chip: Chip) -> Column:
    """The eval step at `run`'s micro-batch, compiled."""
    t = run.train
    rows = t.micro_batch
    log(f"compiling the eval step for {topology} (batch {rows}) ...")
    tokens = rows * t.seq_len
    compiled = compile_lowered("eval", lower_eval(run), chip.hbm_bytes)
    log(f"  {outcome(compiled)}")
    flops = train_flops_per_token(run) / 3 * tokens
    return Column("eval step", compiled, f"{rows} x {t.seq_len}", tokens, flops, None, scanned=run.model.scan_layers)


def costed(column: Column, run: Run, chip: Chip, layer_costs: bool) -> Column:
    """`column` (a train or eval step of `run`) with its unrolled cost figures, when
    `layer_costs` asks for them and the step compiled with its layers scanned."""
    if not (layer_costs and column.scanned) or column.compiled.refused:
        return column
    return dataclasses.replace(column, unrolled=unrolled_cost(run, column.compiled.name, chip.hbm_bytes))


def unrolled_cost(run: Run, program: str, hbm: int) -> tuple[float, float] | None:
    """HLO (FLOPs, HBM bytes) per micro-batch of `program` ('train' or 'eval') with its blocks
    unrolled, for a model that scans them (XLA counts a scan's body once): the blocks are alike,
    so the cost of n layers is c(1) + (n - 1) * (c(2) - c(1)), from 1- and 2-layer compiles of
    the same step. None when either is refused."""
    costs = []
    for layers in (1, 2):
        shallow = unrolled(run, layers, run.train.grad_accum)
        log(f"  compiling the {program} step with {layers} unrolled layer(s) for its cost ...")
        compiled = compile_lowered(program, lower_train(shallow) if program == "train" else lower_eval(shallow), hbm)
        if compiled.refused:
            return None
        costs.append((compiled.flops, compiled.bytes_accessed))
    n = run.model.n_layer
    (f1, b1), (f2, b2) = costs
    return f1 + (n - 1) * (f2 - f1), b1 + (n - 1) * (b2 - b1)


def sampler_columns(run: Run, topology: str, chip: Chip, programs: Sequence[str], rows: int, prompt_len: int) -> list[Column]:
    """The prefill and decode-step columns (see `check`); the decode loop is compiled with the
    prefill's output shardings, so the prefill is compiled even when only decode is asked."""
    from gptjax.sampling.plan import plan_lengths

    gpt, n = run.model, run.mesh.size
    slots = plan_lengths(prompt_len, gpt.block_size - prompt_len, gpt.block_size)[1]
    forward = lambda context: gpt.flops_per_token(context) / 3 / n  # per token, per chip
    log(f"compiling the sampler's prefill for {topology} ({rows} prompts of {prompt_len} tokens) ...")
    prefill_lowered, decode_loop = lower_sampler(run, rows, prompt_len)
    prefill = compile_lowered("prefill", prefill_lowered, chip.hbm_bytes)
    log(f"  {outcome(prefill)}")
    columns = []
    if "prefill" in programs:
        columns.append(Column("prefill", prefill, f"{rows} x {prompt_len}", rows * prompt_len,
                              forward(prompt_len) * rows * prompt_len, None))
    if "decode" in programs:
        log(f"compiling the sampler's decode step for {topology} ({rows} rows, {slots} cache slots) ...")
        step = compile_lowered("decode", decode_loop(prefill.executable), chip.hbm_bytes)
        log(f"  {outcome(step)}")
        columns.append(Column("decode step", step, f"{rows} x 1 (cache {slots})", rows, forward(slots) * rows, None))
    return columns
