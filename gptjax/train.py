"""`python -m gptjax.train`: train or fine-tune a GPT on a device mesh.

    python -m gptjax.train                                   # the built-in CPU demo, in runs/default
    python -m gptjax.train --config configs/gpt2_124m.py --config.optim.lr=3e-4   # in runs/gpt2_124m

Data flow: config -> `gptjax.run.resolve` (mesh, model, optimizer, abstract train state and
shardings) -> `Run.prepare` (tokenizer, data) -> train state, created already sharded or
restored -> the trainer's jitted step (`gptjax.step`) in a loop -> evaluation, metrics and
checkpoints. Running the same command on the same workdir resumes from its latest checkpoint
and continues the same run: the batch for step s depends only on (seed, s).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint as ckpt
from gptjax import config as config_lib
from gptjax import layout
from gptjax import optim as optim_lib
from gptjax import sharding
from gptjax.errors import run_cli
from gptjax.metrics import MetricsWriter, eval_line, eval_metrics, peak_flops
from gptjax.preemption import StopBeforeTraining, StopRequested, any_host
from gptjax.run import Run, resolve
from gptjax.step import TrainState


class RunFailed(Exception):
    """The run cannot go on (it diverged, or a write failed); the CLI prints the message as
    one line and exits with status 1. The checkpoints already written are intact."""


def run(
    config: config_lib.ConfigDict,
    workdir: str,
    dry_run: bool = False,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> dict[str, float]:
    """Train (or resume) the run in `workdir` on `devices` (default: as `resolve` picks); return the final metrics.

    `stop_at` ends this invocation early at that step with a checkpoint, as a preemption
    would; running again continues the same run. A SIGTERM or SIGINT does the same at the end
    of the step in progress (see `gptjax.preemption`); before the first step it stops without
    saving and the result is empty. Divergence and failed writes raise `RunFailed`.
    """
    r = resolve(config, workdir, devices)
    if r.devices_note:
        _log(r.devices_note)
    if dry_run:
        print(optim_lib.format_param_table(r.trainer.abstract_params, r.optimizer))
        if r.resuming:
            _report_resume_point(r)
        return {}
    assert r.run_dir is not None
    with StopRequested() as stop:
        try:
            return _train(r, workdir, stop, stop_at)
        except StopBeforeTraining as e:
            _log(f"stopped by {e} before training started; nothing to save. Run the same command again to continue.")
            return {}


def _train(r: Run, workdir: str, stop: StopRequested, stop_at: int | None) -> dict[str, float]:
    assert r.run_dir is not None
    try:
        r = r.prepare()
        if jax.process_index() == 0:
            ckpt.save_config(r.run_dir, r.config)
    except OSError as e:
        raise _io_failure("preparing the run", e, r.run_dir.root) from e
    assert r.dataset is not None
    trainer, gpt, mesh, t = r.trainer, r.model, r.mesh, r.train
    try:
        checkpointer = ckpt.Checkpointer(r.run_dir, keep=t.keep_checkpoints)
    except OSError as e:
        raise _io_failure("creating the checkpoint directory", e, r.run_dir.checkpoints) from e
    try:
        state, skipped_total = _initial_state(r, checkpointer)
        start = int(state.step)
        if jax.process_index() == 0:  # stdout, like the summary at the end; stderr is for progress and errors
            print(f"workdir {workdir}: " + (f"resuming from step {start}" if r.resuming else "a new run"), flush=True)
        try:
            writer = MetricsWriter(r.run_dir, start)
        except OSError as e:
            raise _io_failure("opening the metrics", e, r.run_dir.metrics) from e
        try:
            final = _loop(r, trainer, state, skipped_total, checkpointer, writer, stop, stop_at)
            try:
                checkpointer.wait()
            except Exception as e:  # an asynchronous save failed after it started
                raise _io_failure(f"saving checkpoint {final['step']}", e, checkpointer.directory) from e
        finally:
            _close_quietly(writer.close)
    finally:
        _close_quietly(checkpointer.close)
    if final["step"] < t.steps:
        _log(f"stopped at step {final['step']}; checkpoint saved. Run the same command again to resume.")
    return final


def _loop(
    r: Run,
    trainer: Any,
    state: TrainState,
    skipped_total: int,
    checkpointer: ckpt.Checkpointer,
    writer: MetricsWriter,
    stop: StopRequested,
    stop_at: int | None,
) -> dict[str, float]:
    """The training steps from `state.step` to the end, a stop request or `stop_at`."""
    assert r.run_dir is not None and r.dataset is not None
    gpt, mesh, t = r.model, r.mesh, r.train
    start = int(state.step)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = gpt.flops_per_token(t.seq_len) * tokens_per_step
    peak = peak_flops(t.peak_tflops, mesh)
    eval_data = r.dataset.eval_batches(t.micro_batch, t.seq_len, t.eval_batches, jax.process_index(), jax.process_count())
    _log(
        f"model: {gpt.num_params() / 1e6:.2f}M params, {gpt.n_layer} layers, width {gpt.n_embd}; "
        f"mesh {dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} device(s); "
        f"vocab {gpt.vocab_size}; {tokens_per_step} tokens/step"
    )
    bad = BadSteps(t.max_bad_steps, skipped_total)
    last_saved = start

    def get_batch(step: int) -> dict[str, np.ndarray]:
        return r.dataset.get_batch(step, t.batch_size, t.seq_len, r.seed, jax.process_index(), jax.process_count())

    def last_good() -> str:
        return f"the last good checkpoint is step {last_saved} in {checkpointer.directory}" if last_saved else (
            "no checkpoint was saved")

    def observe(step: int, metrics: dict[str, jax.Array]) -> None:
        if bad.observe(int(metrics["skipped"])):
            raise RunFailed(
                f"step {step}: the loss or gradient was not finite for {bad.streak} steps in a row "
                f"(train.max_bad_steps={t.max_bad_steps}); stopped without saving; {last_good()}. "
                f"Lower optim.lr or raise optim.warmup_steps and resume"
            )

    def save(step: int) -> None:
        if not trainer.all_finite(state):
            raise RunFailed(f"step {step}: the parameters or optimizer state hold non-finite values; "
                            f"not saved; {last_good()}")
        try:
            checkpointer.wait()
        except Exception as e:  # the previous, asynchronous save failed
            raise _io_failure(f"saving checkpoint {last_saved}", e, checkpointer.directory) from e
        _check_space(step, state, checkpointer.directory, last_good())
        try:
            checkpointer.save(step, state.params, state.opt_state, skipped_steps=bad.total)
        except Exception as e:  # disk full, permissions
            raise _io_failure(f"saving checkpoint {step}", e, checkpointer.directory) from e

    def write(step: int, metrics: dict[str, float]) -> None:
        try:
            writer.write(step, metrics)
        except OSError as e:
            raise _io_failure("writing metrics", e, r.run_dir.metrics) from e

    final: dict[str, float] = {}
    bar = StepProgress(t.steps, start, tokens_per_step)
    window_start, window_steps = time.perf_counter(), 0
    pending: tuple[int, dict[str, jax.Array]] | None = None  # a step whose skip flag is unread
    stop.arm()
    for step in range(start, t.steps):
        state, metrics = trainer.train_step(state, get_batch(step))
        done = step + 1
        if pending is not None:  # read one step late, so the host never waits on the device here
            observe(*pending)
        pending = (done, metrics)
        window_steps += 1
        is_log = done % t.log_every == 0 or done == t.steps
        is_eval = t.eval_batches > 0 and (done % t.eval_every == 0 or done == t.steps)
        is_save = done % t.checkpoint_every == 0 or done == t.steps
        stopping = done == stop_at or (is_log and any_host(stop.requested))
        if jax.process_count() == 1:
            stopping = stopping or stop.requested
        if is_log or is_eval or is_save or stopping:
            observe(*pending)
            pending = None
        if is_log:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            m["skipped_total"] = float(bad.total)
            m["tokens_per_s"] = tokens_per_step * window_steps / elapsed
            m["mfu"] = flops_per_step * window_steps / elapsed / peak
            write(done, m)
            bar.logged(done, m)
            final.update(m)
            window_start, window_steps = time.perf_counter(), 0
        bar.update()
        if is_eval:
            ev = eval_metrics(*trainer.evaluate_sources(state.params, eval_data), r.dataset.sources)
            write(done, ev)
            final.update(ev)
            bar.write(eval_line(done, ev))
            window_start = time.perf_counter()
        if is_save or stopping:
            save(done)
            last_saved = done
        if stopping:
            break
    bar.close()
    final["step"] = int(state.step)
    return final


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


class BadSteps:
    """Counts the steps the non-finite guard skipped: in total and in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.streak = limit, total, 0

    def observe(self, skipped: int) -> bool:
        """Record one step; True when `limit` steps in a row were skipped."""
        self.total += skipped
        self.streak = self.streak + 1 if skipped else 0
        return self.streak >= self.limit


def _initial_state(r: Run, checkpointer: ckpt.Checkpointer) -> tuple[TrainState, int]:
    """(state, steps skipped so far): the newest readable checkpoint's, else init_from's
    parameters, else fresh ones."""
    target = r.trainer.abstract_state()
    restored = checkpointer.restore_latest(target.params, target.opt_state)
    if restored is not None:
        params, opt_state, data = restored
        return TrainState(step=jnp.asarray(data["step"], jnp.int32), params=params, opt_state=opt_state), data["skipped_steps"]
    if r.pretrained is not None:
        return r.trainer.state_from_params(r.pretrained), 0
    return r.trainer.init_state(), 0


def _report_resume_point(r: Run) -> None:
    """For --dry_run: the checkpoint a run would resume from (read in full, as training would),
    each unreadable newer one reported in one line and left where it is."""
    assert r.run_dir is not None
    checkpointer = ckpt.Checkpointer(r.run_dir, keep=r.train.keep_checkpoints)
    try:
        target = r.trainer.abstract_state()
        restored = checkpointer.restore_latest(target.params, target.opt_state, set_aside=False)
    finally:
        checkpointer.close()
    if restored is not None:
        print(f"would resume from checkpoint {restored[2]['step']} in {checkpointer.directory}")


def _io_failure(what: str, e: BaseException, path: str) -> RunFailed:
    """A one-line RunFailed for a failed read or write: what, why, where, and the free space there."""
    where = getattr(e, "filename", None) or path
    reason = e.strerror if isinstance(e, OSError) and e.strerror else ckpt.describe_error(e)
    return RunFailed(f"{what} failed: {reason} ({where}{_free_space(str(where))})")


def _check_space(step: int, state: TrainState, directory: str, last_good: str) -> None:
    """Refuse to start a save that cannot fit: a checkpoint takes about the bytes of the train
    state this host writes, and the older ones stay until it is complete."""
    free = _free_bytes(directory)
    if free is None:
        return
    need = sum(x.nbytes for x in jax.tree_util.tree_leaves((state.params, state.opt_state))) / jax.process_count()
    if free < need * 1.02 + 2**16:  # orbax adds a little metadata to the arrays' bytes
        raise RunFailed(
            f"saving checkpoint {step}: not enough space ({directory}: {free / 2**20:.1f} MiB free, "
            f"a checkpoint takes about {need / 2**20:.1f} MiB); not saved; {last_good}"
        )


def _free_bytes(path: str) -> int | None:
    """Free bytes on the local file system that holds `path` (or its nearest existing parent)."""
    if "://" in path:
        return None
    directory = os.path.abspath(path)
    while not os.path.exists(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _free_space(path: str) -> str:
    free = _free_bytes(path)
    return "" if free is None else f"; {free / 2**20:.1f} MiB free there"


def quiet_background_errors() -> None:
    """For the CLI: errors in library threads (orbax's asynchronous saves, tensorboardX's
    event writer) print no traceback of their own. They reach the main thread (orbax's wait
    and save, the writer's close), which reports them in one line."""
    import logging
    import threading

    from absl import logging as absl_logging

    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    absl_logging.set_verbosity(absl_logging.FATAL)


def _close_quietly(close: Callable[[], None]) -> None:
    """Close, reporting a failure in one line; the run's own outcome stays the error, if any."""
    try:
        close()
    except Exception as e:  # the first failure is already being reported, or the data is on disk
        _log(f"while closing: {ckpt.describe_error(e)}")


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk so a resumed or repeated run skips most compilation.

    JAX_COMPILATION_CACHE_DIR chooses the place (empty: off); the default is ~/.cache/gptjax/xla.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gptjax/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.train",
        description="Train or fine-tune a GPT. Any config field can be set with --config.section.field=value.",
    )
    parser.add_argument("--config", default="", help="a config file with get_config() (default: the built-in CPU demo)")
    parser.add_argument(
        "--workdir", default="", help="run directory: checkpoints, metrics, tokenizer (default: runs/<config file stem>)"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the parameter table (labels, learning rates) and exit")
    args, rest = parser.parse_known_args(argv)

    def body() -> None:
        quiet_background_errors()
        enable_compilation_cache()
        sharding.maybe_initialize_distributed()
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        sharding.arrange_cpu_devices(config.mesh)  # before anything starts JAX's backends
        workdir = args.workdir or layout.default_workdir(args.config)
        try:
            final = run(config, workdir, dry_run=args.dry_run)
        except RunFailed as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if args.dry_run or jax.process_index() != 0 or "step" not in final:
            return
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "val_loss", "val_ppl") if k in final)
        print(f"done: step {final.get('step')}; {summary}")
        print(f"checkpoint: {layout.RunDir.at(workdir).checkpoints}")
        print(f'sample:     python -m gptjax.sample --workdir {shlex.quote(workdir)} --prompt "def " --max_new_tokens 500')

    run_cli(body)


if __name__ == "__main__":
    main()
