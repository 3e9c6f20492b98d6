"""The training loop: the steps from a train state to the end of the run, a stop request or
`stop_at`. After a step, the actions that are due run in order, each one small piece:

    LogMetrics   loss, tokens/s and MFU to the metrics and the progress display
    Evaluate     validation loss, perplexity and bits per byte per source
    Benchmark    the eval section's tasks (multiple choice, bits per byte of other text)
    Save         a checkpoint (also when the run stops early)

and beside them: `Cadence` (which steps log, evaluate, save), `Throughput` (tokens/s and MFU),
`BadSteps` (the non-finite guard's count), `Saves` (checkpoints refused for a non-finite state
or a full disk; the last good one), `StepProgress` (a bar on a terminal, lines in a log).
`build_loop` makes them all once, before the first step. A new periodic action is one more
class with `due` and `__call__`.

The device runs ahead of the host: a step's skip flag is read one step late, and metrics are
fetched only at log steps.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Protocol

import jax

from gptjax import checkpoint as ckpt
from gptjax import sharding
from gptjax.failures import RunFailed, check_space, io_failure
from gptjax.evaluate.bpb import ValidationSet, eval_line
from gptjax.evaluate.tasks import Benchmarks, benchmark_line, prepare_evaluation
from gptjax.chips import peak_flops
from gptjax.metrics import MetricsWriter
from gptjax.outputs import Outputs
from gptjax.preemption import StopRequested
from gptjax.run import Run
from gptjax.runtime import log
from gptjax.schema import TrainConfig
from gptjax.state import TrainState
from gptjax.step import Steps


def train_loop(r: Run, out: Outputs, stop: StopRequested, stop_at: int | None) -> dict[str, float]:
    """The training steps from the state `out` holds to the end, a stop request or `stop_at`,
    the last save on disk; the last logged and evaluated metrics, with the step reached."""
    assert r.dataset is not None
    t, state, start = r.train, out.state, int(out.state.step)
    loop = build_loop(r, out)
    bad, rate, progress = loop.bad, loop.rate, loop.progress
    final: dict[str, float] = {}
    pending: tuple[int, dict[str, jax.Array]] | None = None  # a step whose skip flag is unread
    stop.arm()
    for step in range(start, t.steps):
        # This host's rows of the batch for `step`: a function of (seed, step) alone.
        batch = r.dataset.get_batch(step, t.batch_size, t.seq_len, r.seed, jax.process_index(), jax.process_count())
        state, metrics = r.steps.train_step(state, batch)
        done = step + 1
        if pending is not None:  # read one step late, so the host never waits on the device here
            bad.check(*pending, loop.saves.last_good())
        pending = (done, metrics)
        rate.count()
        stopping = done == stop_at or stop.agreed(at_log_step=loop.cadence.log(done))
        due = [a for a in loop.actions if a.due(done, stopping)]
        if due:
            bad.check(*pending, loop.saves.last_good())
            pending = None
        for action in due:
            final.update(action(done, state, metrics))
        progress.update()
        if stopping:
            break
    progress.close()
    loop.saves.wait()
    final["step"] = int(state.step)
    return final


@dataclasses.dataclass(frozen=True)
class Loop:
    """The loop's pieces, built once (`build_loop`) before the first step."""

    cadence: "Cadence"
    rate: "Throughput"
    bad: "BadSteps"
    saves: "Saves"
    progress: "StepProgress"
    actions: tuple["Action", ...]  # run in this order after the steps they are due at


def build_loop(r: Run, out: Outputs) -> Loop:
    """The pieces of the loop of `r` from the state `out` holds: the evaluation prepared
    (validation set, benchmark tasks), the throughput's peak, the progress display, and the
    actions in order."""
    assert r.run_dir is not None
    t, gpt, mesh, start = r.train, r.model, r.mesh, int(out.state.step)
    tokens_per_step = t.batch_size * t.seq_len
    log(f"model: {gpt.num_params() / 1e6:.2f}M params, {gpt.n_layer} layers, width {gpt.n_embd}; "
        f"mesh {sharding.describe_mesh(mesh)}; "
        f"vocab {gpt.vocab_size}; {tokens_per_step} tokens/step")
    cadence, bad = Cadence(t), BadSteps(t.max_bad_steps, out.skipped_total)
    saves = Saves(out.checkpointer, r.steps, start)
    progress = StepProgress(t.steps, start, tokens_per_step)
    sink = Sink(out.writer, progress, r.run_dir.metrics)
    evaluation = prepare_evaluation(r)
    rate = Throughput(tokens_per_step, gpt.flops_per_token(t.seq_len) * tokens_per_step, peak_flops(t.peak_tflops, mesh))
    actions = (LogMetrics(cadence, rate, bad, sink), Evaluate(cadence, evaluation.validation, r.steps, sink, rate),
               Benchmark(cadence, evaluation.benchmarks, sink, rate), Save(cadence, saves, bad))
    return Loop(cadence, rate, bad, saves, progress, actions)


class Action(Protocol):
    """What the loop does after the steps it is due at, in the order of the loop's list."""

    def due(self, done: int, stopping: bool) -> bool:
        """Whether it runs after step `done` (`stopping`: the run stops after this step)."""

    def __call__(self, done: int, state: TrainState, metrics: dict[str, jax.Array]) -> dict[str, float]:
        """Run after step `done`; the metrics it made, for the run's final summary."""


@dataclasses.dataclass(frozen=True)
class Sink:
    """Where metrics go: the metrics files (a failed write is one line) and the display."""

    writer: MetricsWriter
    progress: "StepProgress"
    path: str  # the metrics file, named in a failure

    def write(self, step: int, metrics: dict[str, float]) -> None:
        try:
            self.writer.write(step, metrics)
        except OSError as e:
            raise io_failure("writing metrics", e, self.path) from e


@dataclasses.dataclass(frozen=True)
class LogMetrics:
    """The step's loss and gradient norm, the skipped steps so far, tokens/s and MFU."""

    cadence: "Cadence"
    rate: "Throughput"
    bad: "BadSteps"
    sink: Sink

    def due(self, done: int, stopping: bool) -> bool:
        return self.cadence.log(done)

    def __call__(self, done: int, state: TrainState, metrics: dict[str, jax.Array]) -> dict[str, float]:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m.update(skipped_total=float(self.bad.total), **self.rate.take())
        self.sink.write(done, m)
        self.sink.progress.logged(done, m)
        return m


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """Validation loss, perplexity and bits per byte per source, on the same held-out batches
    every time (`gptjax.evaluate.bpb.ValidationSet`); the time it takes is left out of tokens/s."""

    cadence: "Cadence"
    val: ValidationSet
    steps: Steps
    sink: Sink
    rate: "Throughput"

    def due(self, done: int, stopping: bool) -> bool:
        return self.cadence.evaluate(done)

    def __call__(self, done: int, state: TrainState, metrics: dict[str, jax.Array]) -> dict[str, float]:
        ev = self.val.metrics(self.steps, state.params)
        self.sink.write(done, ev)
        self.sink.progress.write(eval_line(done, ev))
        self.rate.restart()
        return ev


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The eval section's tasks (`gptjax.evaluate.tasks`), at the evaluation steps; prepared
    once, and left out of tokens/s like the validation loss."""

    cadence: "Cadence"
    tasks: Benchmarks | None
    sink: Sink
    rate: "Throughput"

    def due(self, done: int, stopping: bool) -> bool:
        return self.tasks is not None and self.cadence.benchmark(done)

    def __call__(self, done: int, state: TrainState, metrics: dict[str, jax.Array]) -> dict[str, float]:
        assert self.tasks is not None
        m = self.tasks(state.params)
        self.sink.write(done, m)
        self.sink.progress.write(benchmark_line(done, m))
        self.rate.restart()
        return m


@dataclasses.dataclass(frozen=True)
class Save:
    """A checkpoint at the save steps and when the run stops early."""

    cadence: "Cadence"
    saves: "Saves"
    bad: "BadSteps"

    def due(self, done: int, stopping: bool) -> bool:
        return stopping or self.cadence.save(done)

    def __call__(self, done: int, state: TrainState, metrics: dict[str, jax.Array]) -> dict[str, float]:
        self.saves.save(done, state, self.bad.total)
        return {}


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Which of log / evaluate / benchmark / save the finished step `done` is due for: every
    `*_every` steps (benchmarks: eval_every) and at the last step."""

    train: TrainConfig

    def log(self, done: int) -> bool:
        return done % self.train.log_every == 0 or done == self.train.steps

    def evaluate(self, done: int) -> bool:
        t = self.train
        return t.eval_batches > 0 and (done % t.eval_every == 0 or done == t.steps)

    def benchmark(self, done: int) -> bool:
        return done % self.train.eval_every == 0 or done == self.train.steps

    def save(self, done: int) -> bool:
        return done % self.train.checkpoint_every == 0 or done == self.train.steps


@dataclasses.dataclass
class Throughput:
    """Tokens/s and MFU over the steps since the last log line (`take`); time spent evaluating
    is left out (`restart`)."""

    tokens_per_step: int
    flops_per_step: float
    peak: float  # the mesh's peak FLOP/s
    start: float = dataclasses.field(default_factory=time.perf_counter)  # the window's start
    steps: int = 0  # steps in the window

    def count(self) -> None:
        self.steps += 1

    def restart(self) -> None:
        self.start = time.perf_counter()

    def take(self) -> dict[str, float]:
        """The window's tokens_per_s and mfu; a new window starts."""
        elapsed = time.perf_counter() - self.start
        out = {
            "tokens_per_s": self.tokens_per_step * self.steps / elapsed,
            "mfu": self.flops_per_step * self.steps / elapsed / self.peak,
        }
        self.start, self.steps = time.perf_counter(), 0
        return out


class BadSteps:
    """Counts the steps the non-finite guard skipped: in total and in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.streak = limit, total, 0

    def observe(self, skipped: int) -> bool:
        """Record one step; True when `limit` steps in a row were skipped."""
        self.total += skipped
        self.streak = self.streak + 1 if skipped else 0
        return self.streak >= self.limit

    def check(self, step: int, metrics: dict[str, jax.Array], last_good: str) -> None:
        """Record step `step` from its metrics; RunFailed when the run has diverged."""
        if self.observe(int(metrics["skipped"])):
            raise RunFailed(
                f"step {step}: the loss or gradient was not finite for {self.streak} steps in a row "
                f"(train.max_bad_steps={self.limit}); stopped without saving; {last_good}. "
                f"Lower optim.lr or raise optim.warmup_steps and resume"
            )


class Saves:
    """The run's checkpoints as the loop writes them: a state with non-finite values or a save
    the disk cannot hold is refused, and a failed write is one line naming the last good one."""

    def __init__(self, checkpointer: ckpt.Checkpointer, steps: Steps, start: int):
        self.checkpointer, self.steps, self.last_saved = checkpointer, steps, start

    def last_good(self) -> str:
        if not self.last_saved:
            return "no checkpoint was saved"
        return f"the last good checkpoint is step {self.last_saved} in {self.checkpointer.directory}"

    def save(self, step: int, state: TrainState, skipped_total: int) -> None:
        directory = self.checkpointer.directory
        if not self.steps.all_finite(state):
            raise RunFailed(f"step {step}: the parameters or optimizer state hold non-finite values; "
                            f"not saved; {self.last_good()}")
        self.wait()
        check_space(step, state, directory, self.last_good())
        try:
            self.checkpointer.save(step, state.params, state.opt_state, skipped_steps=skipped_total)
        except Exception as e:  # disk full, permissions
            raise io_failure(f"saving checkpoint {step}", e, directory) from e
        self.last_saved = step

    def wait(self) -> None:
        """Block until the last save, which is asynchronous, is on disk; its failure is one line."""
        try:
            self.checkpointer.wait()
        except Exception as e:  # the asynchronous save failed after it started
            raise io_failure(f"saving checkpoint {self.last_saved}", e, self.checkpointer.directory) from e


class StepProgress:
    """Training progress on process 0 (nothing on the other hosts of a pod): a tqdm bar on
    stderr when it is a terminal; otherwise (a pod's log, a file, a pipe) one plain line per
    logged step, without carriage returns: step, loss, tokens/s and the time left."""

    def __init__(self, total: int, start: int, tokens_per_step: int):
        self.enabled = jax.process_index() == 0
        self.total, self.tokens_per_step = total, tokens_per_step
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")

    def logged(self, step: int, m: dict[str, float]) -> None:
        """Show a logged step's metrics (loss, tokens_per_s)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
        elif self.enabled:
            left_s = (self.total - step) * self.tokens_per_step / max(m["tokens_per_s"], 1e-9)
            eta = time.strftime("%H:%M:%S", time.gmtime(left_s)) if left_s < 86400 else f"{left_s / 3600:.0f} h"
            print(f"step {step}/{self.total}: loss {m['loss']:.4f}, {m['tokens_per_s']:,.0f} tokens/s, ETA {eta}",
                  file=sys.stderr, flush=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, line: str) -> None:
        """A line of its own (stdout), below the bar on a terminal."""
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
