#!/usr/bin/env python
"""Fault injection for `python -m gptjax.train`: kill, stop, damage and starve runs, then compare.

    python tools/fault_inject.py --trials 20
    python tools/fault_inject.py --trials 5 --scenarios sigterm,truncated --workdir_root /tmp/fi
    python tools/fault_inject.py --trials 3 -- --config.model.n_layer=4

First an uninterrupted reference run, and a second one that must match it. Then each kill
trial trains the same run in a fresh workdir, SIGKILLs it one to --max_kills times at chosen
moments, restarts it until it finishes, and compares it with the reference exactly: every
checkpoint step the trial kept (parameters, optimizer state and data position; arrays compared
as raw bytes) and metrics.jsonl record by record without its timing fields (TIMING_FIELDS). It
prints "N/N identical" and the kinds of moment the kills hit. Each kill is classified from what
the workdir showed when it landed:

    startup   the process runs but has not written this attempt's config.json yet (imports,
              reading the config, loading an existing tokenizer and token cache)
    prepare   a tokenizer or token cache is being built (a new `.<name>.tmp-*` directory in the
              workdir or its data/ cache)
    compile   config.json written, no step logged yet: state built or restored, step compiled
    step      training steps
    eval      an eval step's training record is logged and its val record is not
    save      a checkpoint save in flight (a new orbax tmp directory under checkpoints/, or a
              checkpoint step logged whose directory is not there yet)
    shutdown  the last step logged and nothing in flight: closing and exiting

Single-trial scenarios follow (--scenarios), each reported as ok, FAILED or skipped, with one
line why:

    sigterm          SIGTERM mid-step: exit 0 within --sigterm_bound seconds, a checkpoint at
                     the step it stopped, and a restart that finishes identically
    sigterm-twice    SIGTERM, then SIGINT 50 ms later: out within the bound, no traceback, the
                     newest finished checkpoint intact, a restart that finishes identically
    sigterm-prepare  SIGTERM while the tokenizer or token cache is built, and
    sigterm-compile  while the state is built and the step compiled: exit 0 within the bound,
                     no traceback, no tmp directory left, a restart that finishes identically
    truncated        the files of the newest checkpoint cut to half: the restart names the
                     skipped step in one line, falls back to the previous checkpoint and
                     finishes identically
    diverge          a restart with --diverge_lr: exit 1, the last line `error: ...` naming the
                     last good checkpoint's step, no traceback, no checkpoint with a non-finite
                     value, the last good checkpoint kept unchanged
    disk             training into a tmpfs that holds one checkpoint: exit 1, the last line
                     `error: ...` naming the place, no traceback, the previous checkpoint
                     intact (needs root for mount; skipped otherwise)

truncated and diverge restart a copy of the reference's workdir taken at one of its checkpoints
(what a run killed just after that save leaves), so each costs one run.

Unless --shape config is given, a tiny model on a small generated corpus is trained
(tiny_overrides), so a restart costs seconds; overrides after `--` are passed to every run and
win. Compilations go to a compilation cache private to this invocation. Exit status 0 when every
trial is identical and no scenario failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# metrics.jsonl fields that measure time and so differ between any two runs.
TIMING_FIELDS = frozenset({"tokens_per_s", "mfu"})
TIMING_SUFFIXES = ("_per_s", "_time", "_time_s", "_ms", "_sec", "_seconds")

KINDS = ("startup", "prepare", "compile", "step", "eval", "save", "shutdown")
# Trial i's first kill aims at TARGETS[i % len(TARGETS)] ("random": a uniform time), so any
# run of len(TARGETS) trials covers every kind; later kills draw from LATER_TARGETS.
TARGETS = ("prepare", "step", "save", "eval", "random", "compile")
SEEN_AND_KILLED = ("prepare", "eval")  # short stretches: killed the moment they are seen
LATER_TARGETS = ("random", "step", "save", "eval")
SCENARIOS = ("sigterm", "sigterm-twice", "sigterm-prepare", "sigterm-compile", "truncated", "diverge", "disk")

POLL_S = 0.003
TRACEBACK = "Traceback (most recent call last)"


def tiny_overrides(corpus_glob: str) -> list[str]:
    """A model and data small enough that a restart costs seconds on a CPU."""
    return [
        "--config.model.n_layer=2",
        "--config.model.n_embd=64",
        "--config.model.n_head=2",
        "--config.model.block_size=64",
        "--config.train.seq_len=64",
        "--config.train.batch_size=8",
        "--config.train.eval_batches=4",
        "--config.train.peak_tflops=1",  # MFU against a given peak: no matmul measured at start
        "--config.tokenizer.vocab_size=300",
        "--config.optim.warmup_steps=5",
        f"--config.data.source=files:{corpus_glob}",
        "--config.data.val_fraction=0.1",
    ]


def write_corpus(directory: str) -> str:
    """Forty small program-like documents; returns their glob."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    os.makedirs(directory, exist_ok=True)
    for d in range(40):
        text = "".join(
            f"def f{d}_{i}({rng.choice(words)}):\n    return {rng.choice(words)} + {i}\n" for i in range(20)
        )
        with open(os.path.join(directory, f"doc{d:02d}.txt"), "w") as f:
            f.write(text)
    return os.path.join(directory, "*.txt")


def is_timing_field(name: str) -> bool:
    return name in TIMING_FIELDS or name.endswith(TIMING_SUFFIXES)


# -- the run directory, read from outside --------------------------------------------------------


def finished_steps(workdir: str) -> list[int]:
    """Checkpoint steps whose directory orbax has finalized (renamed from its tmp name)."""
    directory = os.path.join(workdir, "checkpoints")
    try:
        return sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    except OSError:
        return []


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _tmp_entries(workdir: str) -> tuple[set[str], set[str]]:
    """(preparation tmp dirs, checkpoint tmp dirs) present in a workdir now."""
    prep = {n for n in _listdir(workdir) if n.startswith(".") and ".tmp" in n}
    prep |= {"data/" + n for n in _listdir(os.path.join(workdir, "data")) if n.startswith(".") and ".tmp" in n}
    saves = {n for n in _listdir(os.path.join(workdir, "checkpoints")) if not n.isdigit() and "tmp" in n.lower()}
    return prep, saves


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved train settings the classifier needs (read from a run's config.json)."""

    steps: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int

    @classmethod
    def of(cls, workdir: str) -> "Settings":
        with open(os.path.join(workdir, "config.json")) as f:
            t = json.load(f)["train"]
        return cls(t["steps"], t["eval_every"], t["eval_batches"], t["checkpoint_every"])

    def is_eval_step(self, step: int) -> bool:
        return self.eval_batches > 0 and (step % self.eval_every == 0 or step == self.steps)

    def is_checkpoint_step(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps


class Watch:
    """What one attempt of a run is doing, judged from its workdir alone.

    Only what appeared after the attempt started counts: tmp directories a killed attempt left
    behind, and metrics records from before the restart, are ignored.
    """

    def __init__(self, workdir: str, settings: Settings | None, started_ns: int):
        self.workdir, self.settings, self.started_ns = workdir, settings, started_ns
        self.old_prep, self.old_saves = _tmp_entries(workdir)
        steps = finished_steps(workdir)
        self.resumed_from = steps[-1] if steps else 0
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.offset = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
        self.logged: dict[int, set[str]] = {}  # step -> record kinds written this attempt
        self.last_step: int | None = None

    def _read_new_records(self) -> None:
        try:
            size = os.path.getsize(self.metrics_path)
        except OSError:
            return
        if size < self.offset:  # truncated or rewritten on resume: read it again from the start
            self.offset = 0
        if size == self.offset:
            return
        with open(self.metrics_path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = int(record.get("step", -1))
            if step <= self.resumed_from:
                continue
            kind = "eval" if any(k.startswith("val_") for k in record) else "train"
            self.logged.setdefault(step, set()).add(kind)
            self.last_step = step

    def moment(self) -> str:
        """The kind of moment (see KINDS) the run is in now."""
        self._read_new_records()
        prep, saves = _tmp_entries(self.workdir)
        if prep - self.old_prep:
            return "prepare"
        if saves - self.old_saves:
            return "save"
        try:
            config_written = os.stat(os.path.join(self.workdir, "config.json")).st_mtime_ns >= self.started_ns
        except OSError:
            config_written = False
        if not config_written:
            return "startup"
        if self.settings is None:
            self.settings = Settings.of(self.workdir)
        if self.last_step is None:
            return "compile"
        s, kinds = self.last_step, self.logged[self.last_step]
        evaluated = "eval" in kinds or not self.settings.is_eval_step(s)
        if not evaluated and "train" in kinds:
            return "eval"
        if evaluated and self.settings.is_checkpoint_step(s) and s not in finished_steps(self.workdir):
            return "save"
        if s >= self.settings.steps:
            return "shutdown"
        return "step"


# -- running the trainer -------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    """One start of the trainer on a workdir."""

    proc: subprocess.Popen
    workdir: str
    err_path: str
    started: float
    started_ns: int

    def stderr(self) -> str:
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None after killing it for running past `timeout`."""
        try:
            return self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait()
            return None

    def kill(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def stderr_lines(text: str) -> list[str]:
    """The lines a reader of stderr would see: progress bars and their redraws dropped."""
    out = []
    for raw in text.split("\n"):
        parts = [p.strip() for p in raw.split("\r") if p.strip()]
        if not parts:
            continue
        line = parts[-1]
        if re.match(r"^\S.*\d+%\|", line) or re.match(r"^\d+%\|", line) or re.search(r"\d+/\d+ \[[\d:]+<", line):
            continue
        out.append(line)
    return out


class Harness:
    """Starts runs of `python -m gptjax.train` under one root directory, one at a time."""

    def __init__(self, root: str, train_args: list[str], env: dict[str, str] | None = None, seed: int = 0):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.train_args = list(train_args)
        env = dict(os.environ if env is None else env)
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(self.root, "xla-cache")  # this invocation's own
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.rng = random.Random(seed)
        self.reference: Reference | None = None
        self._attempts: dict[str, int] = {}
        self._live: list[Attempt] = []

    def workdir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        return path

    def start(self, workdir: str, extra: list[str] = ()) -> Attempt:
        n = self._attempts[workdir] = self._attempts.get(workdir, 0) + 1
        logs = os.path.join(self.root, "logs")
        os.makedirs(logs, exist_ok=True)
        stem = os.path.join(logs, f"{os.path.basename(workdir)}.{n}")
        cmd = [sys.executable, "-m", "gptjax.train", "--workdir", workdir, *self.train_args, *extra]
        started_ns = time.time_ns()
        with open(stem + ".out", "w") as out, open(stem + ".err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=err, start_new_session=True)
        self._live = [a for a in self._live if a.proc.poll() is None]
        self._live.append(Attempt(proc, workdir, stem + ".err", time.monotonic(), started_ns))
        return self._live[-1]

    def close(self) -> None:
        """Kill any run still going (after an error or an interrupt in the harness)."""
        for attempt in self._live:
            if attempt.proc.poll() is None:
                attempt.kill(signal.SIGKILL)
                attempt.proc.wait()
        self._live = []

    def copy_reference(self, name: str, upto: int) -> str:
        """A workdir holding the reference run as it was when its checkpoint `upto` had just been
        saved: the same tokenizer, token cache and config, checkpoints up to `upto`, and the
        metrics records up to it. Restarting it continues the reference run."""
        ref, workdir = self.reference, self.workdir(name)
        shutil.copytree(ref.workdir, workdir, ignore=lambda d, names: (
            [n for n in names if n.isdigit() and int(n) > upto] if os.path.basename(d) == "checkpoints"
            else ["tb"] if d == ref.workdir else []))
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in ref.metrics if r.get("step", 0) <= upto)
        return workdir

    def watch(self, attempt: Attempt) -> Watch:
        settings = self.reference.settings if self.reference else None
        return Watch(attempt.workdir, settings, attempt.started_ns)

    @property
    def attempt_timeout(self) -> float:
        return max(300.0, 10 * self.reference.duration) if self.reference else 1800.0

    def run_to_end(self, workdir: str, extra: list[str] = ()) -> tuple[int | None, str]:
        """Start a run, wait for it; (exit status or None if it hung, its stderr)."""
        attempt = self.start(workdir, extra)
        rc = attempt.wait(self.attempt_timeout)
        return rc, attempt.stderr()

    def poll_until(self, attempt: Attempt, watch: Watch, done: Callable[[str], bool]) -> str | None:
        """Poll until `done(moment)`; the moment then, or None if the process ended first."""
        deadline = time.monotonic() + self.attempt_timeout
        while attempt.proc.poll() is None and time.monotonic() < deadline:
            moment = watch.moment()
            if done(moment):
                return moment
            time.sleep(POLL_S)
        return None

    def kill_now(self, attempt: Attempt, watch: Watch) -> str:
        """SIGKILL the attempt; the moment it hit (judged once it is dead), e.g. 'save@30'."""
        attempt.kill(signal.SIGKILL)
        attempt.proc.wait()
        moment = watch.moment()
        if watch.last_step is not None and moment in ("step", "eval", "save"):
            return f"{moment}@{watch.last_step}"
        return moment


# -- checkpoints, read as numpy -------------------------------------------------------------------


def _quiet_orbax() -> Any:
    import warnings

    warnings.filterwarnings("ignore", module="orbax")
    warnings.filterwarnings("ignore", message=".*[Ss]harding info not provided.*")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    import orbax.checkpoint as ocp

    return ocp


def read_checkpoint(step_dir: str) -> dict[str, Any]:
    """Every item of a finished orbax step directory: JSON items as dicts, array trees as
    {path: numpy array} (restored onto this process's first device, whatever mesh saved them)."""
    ocp = _quiet_orbax()
    import jax
    import numpy as np

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
        handlers = json.load(f).get("item_handlers") or {}
    items: dict[str, Any] = {}
    for name, handler in sorted(handlers.items()):
        path = os.path.join(step_dir, name)
        if "Json" in str(handler):
            with open(os.path.join(path, "metadata")) as f:
                items[name] = json.load(f)
            continue
        with ocp.StandardCheckpointer() as checkpointer:
            meta = checkpointer.metadata(path)
            meta = getattr(meta, "item_metadata", meta)  # a StepMetadata in newer orbax, the tree in older
            target = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), meta,
                is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
            tree = checkpointer.restore(path, target)
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        items[name] = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
    return items


def compare_checkpoints(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Differences between two read checkpoints, one line per item; [] when bitwise equal."""
    import numpy as np

    problems = []
    for name in sorted(set(ref) | set(got)):
        if name not in got or name not in ref:
            problems.append(f"item {name} only in the {'reference' if name in ref else 'trial'}")
            continue
        a, b = ref[name], got[name]
        if not all(isinstance(x, dict) and all(isinstance(v, np.ndarray) for v in x.values()) for x in (a, b)):
            if a != b:
                problems.append(f"{name} {b} != reference {a}")
            continue
        if set(a) != set(b):
            problems.append(f"{name}: tree differs ({len(set(a) ^ set(b))} paths)")
            continue
        bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
        if bad:
            k = bad[0]
            same_shape = a[k].shape == b[k].shape
            diff = np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))) if same_shape else "shape"
            problems.append(f"{name}: {len(bad)} of {len(a)} arrays differ (first {k}, max |diff| {diff})")
    return problems


def all_finite(items: dict[str, Any]) -> list[str]:
    """Array paths holding a NaN or infinity."""
    import numpy as np

    bad = []
    for name, tree in items.items():
        if isinstance(tree, dict):
            for k, v in tree.items():
                if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
                    bad.append(f"{name}{k}")
    return bad


def _record_key(record: dict[str, Any]) -> tuple[int, str]:
    return int(record.get("step", -1)), "eval" if any(k.startswith("val_") for k in record) else "train"


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in record.items() if not is_timing_field(k)}, sort_keys=True)


def _spans(steps: list[int]) -> str:
    steps, out, i = sorted(set(steps)), [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ",".join(out)


def compare_metrics(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[str]:
    """Differences between two metrics.jsonl files, timing fields dropped; [] when equal."""
    if [_canonical(r) for r in ref] == [_canonical(r) for r in got]:
        return []
    problems = []
    seen: dict[tuple[int, str], int] = {}
    for r in got:
        seen[_record_key(r)] = seen.get(_record_key(r), 0) + 1
    repeated = {k: n for k, n in seen.items() if n > 1}
    if repeated:
        extra = sum(n - 1 for n in repeated.values())
        problems.append(f"metrics.jsonl repeats {extra} records (steps {_spans([s for s, _ in repeated])})")
    last: dict[tuple[int, str], str] = {}
    for r in got:
        last[_record_key(r)] = _canonical(r)
    ref_keys = [_record_key(r) for r in ref]
    if set(last) != set(ref_keys):
        missing = [s for s, _ in set(ref_keys) - set(last)]
        added = [s for s, _ in set(last) - set(ref_keys)]
        if missing:
            problems.append(f"metrics.jsonl lacks steps {_spans(missing)}")
        if added:
            problems.append(f"metrics.jsonl has steps the reference lacks: {_spans(added)}")
    differing = [k[0] for k, r in zip(ref_keys, ref) if k in last and last[k] != _canonical(r)]
    if differing:
        problems.append(f"metrics.jsonl values differ at steps {_spans(differing)}")
    return problems or ["metrics.jsonl holds the reference's records in another order"]


# -- the reference and the comparison -------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    """The uninterrupted run everything is compared with, and how long its phases took."""

    workdir: str
    settings: Settings
    duration: float  # seconds one uninterrupted run takes (from the warm cache when repeated)
    phase_s: dict[str, float]  # median length of one stretch of each kind of moment
    metrics: list[dict[str, Any]]
    _checkpoints: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def checkpoint(self, step: int) -> dict[str, Any]:
        if step not in self._checkpoints:
            self._checkpoints[step] = read_checkpoint(os.path.join(self.workdir, "checkpoints", str(step)))
        return self._checkpoints[step]


def run_reference(h: Harness, repeat: bool = True) -> Reference:
    """Train uninterrupted, keeping every checkpoint, and time its kinds of moment.

    With `repeat`, a second uninterrupted run must end identically (else no trial could), and
    its duration, compiled from the cache as restarts are, sets the range of random kills.
    """
    workdir = h.workdir("reference")
    attempt = h.start(workdir, ["--config.train.keep_checkpoints=1000000"])
    watch = h.watch(attempt)
    stretches: list[tuple[str, float]] = []
    current, since = None, time.monotonic()
    while attempt.proc.poll() is None:
        moment = watch.moment()
        if moment != current:
            now = time.monotonic()
            if current is not None:
                stretches.append((current, now - since))
            current, since = moment, now
        time.sleep(POLL_S)
    rc = attempt.proc.wait()
    duration = time.monotonic() - attempt.started
    if rc != 0:
        lines = stderr_lines(attempt.stderr())
        raise RuntimeError(f"the reference run failed (exit {rc}): {lines[-1] if lines else 'no output'}")
    settings = Settings.of(workdir)
    if finished_steps(workdir)[-1:] != [settings.steps]:
        raise RuntimeError(f"the reference run ended without a checkpoint at step {settings.steps}")
    phase_s = {}
    for kind in KINDS:
        lengths = sorted(d for k, d in stretches if k == kind)
        if lengths:
            phase_s[kind] = lengths[len(lengths) // 2]
    ref = Reference(workdir, settings, duration, phase_s, read_metrics(workdir))
    h.reference = ref
    if repeat:
        again = h.workdir("reference-again")
        t0 = time.monotonic()
        rc, err = h.run_to_end(again)
        if rc != 0:
            raise RuntimeError(f"the second uninterrupted run failed (exit {rc}): {_last_line(err)}")
        problems = compare_state(ref, again) + compare_metrics(ref.metrics, read_metrics(again))
        if problems:
            raise RuntimeError("two uninterrupted runs differ, so no trial can match: " + "; ".join(problems))
        ref.duration = time.monotonic() - t0
    return ref


def compare_state(ref: Reference, workdir: str) -> list[str]:
    """Differences in the checkpoints (every step both hold; the final step must be one)."""
    steps = finished_steps(workdir)
    if not steps or steps[-1] != ref.settings.steps:
        return [f"ended at checkpoint {steps[-1] if steps else 'none'}, not {ref.settings.steps}"]
    problems = []
    for step in steps:
        if os.path.isdir(os.path.join(ref.workdir, "checkpoints", str(step))):
            try:
                got = read_checkpoint(os.path.join(workdir, "checkpoints", str(step)))
            except Exception as e:  # an unreadable checkpoint is a finding, not a harness error
                problems.append(f"step {step} unreadable ({type(e).__name__}: {str(e)[:80]})")
                continue
            problems += [f"step {step} {p}" for p in compare_checkpoints(ref.checkpoint(step), got)]
    return problems


# -- kill trials ----------------------------------------------------------------------------------


@dataclasses.dataclass
class TrialResult:
    """What one kill trial hit and how its end differs from the reference."""

    index: int
    kills: list[str]  # the moment each kill hit, e.g. "save@30" (kind@last step logged)
    state_problems: list[str]
    metrics_problems: list[str]

    @property
    def identical(self) -> bool:
        return not self.state_problems and not self.metrics_problems

    def line(self) -> str:
        problems = self.state_problems + self.metrics_problems
        verdict = "DIFFERENT: " + "; ".join(problems) if problems else "identical"
        return f"trial {self.index}: {verdict}; kills: {', '.join(self.kills) or 'none (finished first)'}"


def _kill_on(h: Harness, attempt: Attempt, target: str) -> str | None:
    """Kill the attempt at a moment of kind `target`; the moment hit, or None if the run
    finished first.

    'random' is a uniform time over the reference's duration. For step, eval and save a step
    is drawn first (among the steps of that kind after the one the attempt resumes from) and
    the kill waits for that kind of moment at or after it, so kills spread over the run;
    `kind@N` (e.g. 'eval@10') names that step instead of drawing it.
    """
    ref, settings = h.reference, h.reference.settings
    watch = h.watch(attempt)
    target, _, named = target.partition("@")
    if target == "random":
        deadline = attempt.started + h.rng.uniform(0.0, ref.duration)
        while attempt.proc.poll() is None and time.monotonic() < deadline:
            watch.moment()  # keeps up with metrics as they are written
            time.sleep(POLL_S)
        return None if attempt.proc.poll() is not None else h.kill_now(attempt, watch)
    after = range(watch.resumed_from + 1, settings.steps + 1)
    candidates = {"step": [s for s in after if s < settings.steps],
                  "eval": [s for s in after if settings.is_eval_step(s)],
                  "save": [s for s in after if settings.is_checkpoint_step(s)]}.get(target)
    not_before = int(named) if named else h.rng.choice(candidates) if candidates else 0
    reached = lambda m: m == target and (watch.last_step or watch.resumed_from) >= not_before
    if h.poll_until(attempt, watch, reached) is None:
        return None
    # Somewhere inside the stretch: a random delay up to half its typical length, cut short
    # when the stretch ends first. A preparation and an evaluation are killed as soon as they
    # are seen: both can end between two polls on a loaded machine, and a kill after the end of
    # its stretch lands in the next kind of moment instead.
    spread = 0.0 if target in SEEN_AND_KILLED else min(ref.phase_s.get(target, 0.05) / 2, 2.0)
    end = time.monotonic() + h.rng.uniform(0.0, spread)
    while attempt.proc.poll() is None and time.monotonic() < end and watch.moment() == target:
        time.sleep(POLL_S)
    return None if attempt.proc.poll() is not None else h.kill_now(attempt, watch)


def kill_trial(h: Harness, index: int, targets: list[str]) -> TrialResult:
    """Train in a fresh workdir, killing at the given kinds of moment in turn, then restart
    until it finishes; compare with the reference."""
    workdir = h.workdir(f"trial{index:03d}")
    kills: list[str] = []
    pending = list(targets)
    while True:  # each pass either kills (one target fewer) or runs to the end
        attempt = h.start(workdir)
        if pending:
            hit = _kill_on(h, attempt, pending.pop(0))
            if hit is not None:
                kills.append(hit)
                continue
        rc = attempt.wait(h.attempt_timeout)
        if rc == 0:
            break
        lines = stderr_lines(attempt.stderr())
        why = "hung" if rc is None else f"exit {rc}: {lines[-1] if lines else 'no output'}"
        return TrialResult(index, kills, [f"a restart failed ({why})"], [])
    ref = h.reference
    return TrialResult(index, kills, compare_state(ref, workdir), compare_metrics(ref.metrics, read_metrics(workdir)))


def plan_trial(rng: random.Random, index: int, max_kills: int) -> list[str]:
    """The kinds of moment trial `index` aims its kills at."""
    n = rng.randint(1, max(1, max_kills))
    return [TARGETS[index % len(TARGETS)]] + [rng.choice(LATER_TARGETS) for _ in range(n - 1)]


# -- single-trial scenarios -----------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """A scenario's verdict and its one-line reason."""

    name: str
    status: str  # "ok", "FAILED" or "skipped"
    why: str

    def line(self) -> str:
        return f"{self.name}: {self.status} ({self.why})"


def _outcome(name: str, problems: list[str], ok_why: str) -> Outcome:
    return Outcome(name, "FAILED", "; ".join(problems)) if problems else Outcome(name, "ok", ok_why)


def _last_line(text: str) -> str:
    lines = stderr_lines(text)
    return lines[-1] if lines else ""


@dataclasses.dataclass
class Stopped:
    """A run stopped by signals: how it ended and what the workdir showed."""

    workdir: str
    rc: int | None
    exit_s: float  # from the first signal to the process's end
    saved_s: float | None  # from the first signal to a new finished checkpoint, if one came
    stop_step: int | None  # the last step it logged
    stderr: str


def _stop_with(h: Harness, name: str, ready: Callable[[Watch], bool], signals: list[int],
               limit_s: float) -> Stopped | None:
    """Start a fresh run, wait until `ready(watch)`, send `signals` 50 ms apart and wait for
    the end (killing it after limit_s); None if the run finished before it was ready."""
    workdir = h.workdir(name)
    attempt = h.start(workdir)
    watch = h.watch(attempt)
    if h.poll_until(attempt, watch, lambda m: ready(watch)) is None:
        attempt.wait(h.attempt_timeout)
        return None
    before = set(finished_steps(workdir))
    t0 = time.monotonic()
    saved_s = None
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.05)
        attempt.kill(sig)
    while attempt.proc.poll() is None and time.monotonic() - t0 < limit_s:
        if saved_s is None and set(finished_steps(workdir)) - before:
            saved_s = time.monotonic() - t0
        time.sleep(POLL_S)
    rc = attempt.wait(limit_s - (time.monotonic() - t0))
    exit_s = time.monotonic() - t0
    watch.moment()
    return Stopped(workdir, rc, exit_s, saved_s, watch.last_step, attempt.stderr())


def _stop_problems(stopped: Stopped, bound_s: float, want_rc: int | None) -> list[str]:
    problems = []
    if stopped.rc is None:
        problems.append("hung")
    elif want_rc is not None and stopped.rc != want_rc:
        problems.append(f"exit {stopped.rc}, not {want_rc}: {_last_line(stopped.stderr)!r}")
    if stopped.exit_s > bound_s:
        problems.append(f"took {stopped.exit_s:.1f} s to exit (bound {bound_s:g} s)")
    if TRACEBACK in stopped.stderr:
        problems.append("a traceback on stderr")
    return problems


def _restart_problems(h: Harness, workdir: str, metrics: bool) -> list[str]:
    """Run the workdir to the end; what differs from the reference (metrics.jsonl too if asked)."""
    rc, err = h.run_to_end(workdir)
    if rc != 0:
        return [f"the restart failed ({'hung' if rc is None else f'exit {rc}: {_last_line(err)}'})"]
    ref = h.reference
    return compare_state(ref, workdir) + (compare_metrics(ref.metrics, read_metrics(workdir)) if metrics else [])


def _mid_interval(h: Harness) -> Callable[[Watch], bool]:
    """Ready when a step after the first checkpoint and away from the next one is running.

    On a small model the asynchronous save of the previous checkpoint can outlast the whole
    interval, so a step that runs while that save is still being written counts too (the stop
    must then finish that save and write its own)."""
    ce = h.reference.settings.checkpoint_every

    def ready(w: Watch) -> bool:
        s = w.last_step
        return w.moment() in ("step", "save") and s is not None and s > ce and s % ce not in (0, ce - 1)

    return ready


def scenario_sigterm(h: Harness, bound_s: float) -> Outcome:
    """SIGTERM mid-step: exit 0 within bound_s, a checkpoint at the stop step, identical resume."""
    name = "sigterm"
    stopped = _stop_with(h, name, _mid_interval(h), [signal.SIGTERM], bound_s + 60.0)
    if stopped is None:
        return Outcome(name, "FAILED", "the run ended before a mid-interval step")
    problems = _stop_problems(stopped, bound_s, want_rc=0)
    have = finished_steps(stopped.workdir)
    if stopped.stop_step not in have:
        problems.append(f"no checkpoint at the stop step {stopped.stop_step} (have {have})")
    problems += _restart_problems(h, stopped.workdir, metrics=True)
    saved = "" if stopped.saved_s is None else f"checkpoint {stopped.stop_step} final after {stopped.saved_s:.1f} s, "
    return _outcome(name, problems, f"{saved}exit 0 after {stopped.exit_s:.1f} s; resumed identically")


def scenario_sigterm_twice(h: Harness, bound_s: float) -> Outcome:
    """SIGTERM then SIGINT 50 ms later, mid-step: out within bound_s, no traceback, the newest
    finished checkpoint equal to the reference's, identical resume (checkpoints)."""
    name = "sigterm-twice"
    stopped = _stop_with(h, name, _mid_interval(h), [signal.SIGTERM, signal.SIGINT], bound_s + 60.0)
    if stopped is None:
        return Outcome(name, "FAILED", "the run ended before a mid-interval step")
    problems = _stop_problems(stopped, bound_s, want_rc=None)
    have = finished_steps(stopped.workdir)
    if have and os.path.isdir(os.path.join(h.reference.workdir, "checkpoints", str(have[-1]))):
        try:
            got = read_checkpoint(os.path.join(stopped.workdir, "checkpoints", str(have[-1])))
            diff = compare_checkpoints(h.reference.checkpoint(have[-1]), got)
            problems += [f"checkpoint {have[-1]}: {p}" for p in diff]
        except Exception as e:  # an unreadable checkpoint is a finding, not a harness error
            problems.append(f"checkpoint {have[-1]} unreadable ({type(e).__name__})")
    problems += _restart_problems(h, stopped.workdir, metrics=False)
    return _outcome(name, problems, f"exit {stopped.rc} after {stopped.exit_s:.1f} s, checkpoint {have[-1:]} intact; "
                                    "resumed identically")


def scenario_sigterm_early(h: Harness, kind: str, bound_s: float) -> Outcome:
    """SIGTERM during `kind` ('prepare' or 'compile'): exit 0 within bound_s, no traceback, no
    tmp directory left, identical resume."""
    name = f"sigterm-{kind}"
    stopped = _stop_with(h, name, lambda w: w.moment() == kind, [signal.SIGTERM], bound_s + 60.0)
    if stopped is None:
        return Outcome(name, "FAILED", f"the run ended before a {kind} moment")
    problems = _stop_problems(stopped, bound_s, want_rc=0)
    left = sorted(set().union(*_tmp_entries(stopped.workdir)))
    if left:
        problems.append(f"tmp directories left: {left}")
    problems += _restart_problems(h, stopped.workdir, metrics=True)
    return _outcome(name, problems, f"exit 0 after {stopped.exit_s:.1f} s; resumed identically")


def _truncate_files(directory: str) -> int:
    n = 0
    for dirpath, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(dirpath, f)
            size = os.path.getsize(path)
            if size > 1:
                os.truncate(path, size // 2)
                n += 1
    return n


def _names_step(line: str, step: int) -> bool:
    return re.search(rf"(?<![\d.]){step}(?![\d.])", line) is not None


def scenario_truncated(h: Harness) -> Outcome:
    """The newest checkpoint's files cut short: one line names it, the previous one is used."""
    name, ref = "truncated", h.reference
    steps = finished_steps(ref.workdir)
    if len(steps) < 3:
        return Outcome(name, "skipped", f"the reference saved {len(steps)} checkpoints; this needs 3")
    previous, newest = steps[len(steps) // 2 - 1], steps[len(steps) // 2]
    workdir = h.copy_reference("truncated", upto=newest)
    cut = _truncate_files(os.path.join(workdir, "checkpoints", str(newest)))
    rc, err = h.run_to_end(workdir)
    problems = []
    if rc != 0:
        problems.append("hung" if rc is None else f"exit {rc}: {_last_line(err)}")
    if TRACEBACK in err:
        problems.append("a traceback on stderr")
    naming = [l for l in stderr_lines(err) if _names_step(l, newest) and "checkpoint" in l.lower()]
    if len(naming) != 1:
        problems.append(f"{len(naming)} stderr lines name the damaged checkpoint {newest} (want 1)")
    if not any(_names_step(l, previous) for l in stderr_lines(err)):
        problems.append(f"no stderr line names the checkpoint {previous} it should fall back to")
    if rc == 0:
        problems += compare_state(ref, workdir)
    return _outcome(name, problems, f"{cut} files of step {newest} cut; '{naming[0] if naming else ''}'; "
                                    f"resumed from {previous}, finished identically")


def scenario_diverge(h: Harness, lr: str) -> Outcome:
    """A restart with a learning rate that makes the loss non-finite: exit 1, one line, every
    checkpoint finite, the last good one unchanged."""
    name, ref = "diverge", h.reference
    steps = finished_steps(ref.workdir)
    if len(steps) < 3:
        return Outcome(name, "skipped", f"the reference saved {len(steps)} checkpoints; this needs 3")
    good = steps[len(steps) // 2 - 1]
    workdir = h.copy_reference("diverge", upto=good)
    before = read_checkpoint(os.path.join(workdir, "checkpoints", str(good)))
    rc, err = h.run_to_end(workdir, [f"--config.optim.lr={lr}"])
    problems = []
    if rc != 1:
        problems.append("hung" if rc is None else f"exit {rc}, not 1")
    if TRACEBACK in err:
        problems.append("a traceback on stderr")
    nonfinite = []
    for step in finished_steps(workdir):
        try:
            bad = all_finite(read_checkpoint(os.path.join(workdir, "checkpoints", str(step))))
        except Exception as e:  # an unreadable checkpoint is a finding, not a harness error
            bad = [f"unreadable ({type(e).__name__})"]
        if bad:
            nonfinite.append(step)
    if nonfinite:
        problems.append(f"non-finite values in checkpoints {nonfinite}")
    steps = finished_steps(workdir)
    if good not in steps:
        problems.append(f"the last good checkpoint {good} was deleted (left: {steps})")
    elif compare_checkpoints(before, read_checkpoint(os.path.join(workdir, "checkpoints", str(good)))):
        problems.append(f"the last good checkpoint {good} changed")
    last = _last_line(err)
    finite_steps = [s for s in steps if s not in nonfinite]
    if rc == 1 and finite_steps and not (last.startswith("error:") and _names_step(last, finite_steps[-1])):
        problems.append(f"the last line is not 'error: ...' naming the last good checkpoint {finite_steps[-1]}: "
                        f"{last[:160]!r}")
    return _outcome(name, problems, f"exit 1: '{last}'; checkpoint {good} kept")


def scenario_disk(h: Harness) -> Outcome:
    """Train into a tmpfs with room for one checkpoint: exit 1, one line, previous one intact."""
    name, ref = "disk", h.reference
    mount = os.path.join(h.root, "small-disk")
    os.makedirs(mount, exist_ok=True)
    ckpt_kb = _du_kb(os.path.join(ref.workdir, "checkpoints", str(ref.settings.steps)))
    rest_kb = _du_kb(ref.workdir) - _du_kb(os.path.join(ref.workdir, "checkpoints"))
    size_kb = int(rest_kb + 1.5 * ckpt_kb) + 64
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mount],
                              capture_output=True, text=True)
    except OSError as e:
        return Outcome(name, "skipped", f"cannot run mount: {e}")
    if proc.returncode != 0:
        return Outcome(name, "skipped", f"cannot mount a tmpfs: {proc.stderr.strip() or proc.returncode}")
    try:
        workdir = os.path.join(mount, "disk")
        rc, err = h.run_to_end(workdir)
        problems = []
        if rc != 1:
            problems.append("hung" if rc is None else f"exit {rc}, not 1")
        if TRACEBACK in err:
            problems.append("a traceback on stderr")
        last = _last_line(err)
        if not (last.startswith("error:") and mount in last):
            problems.append(f"the last line is not 'error: ...' naming the place: {last[:160]!r}")
        steps = finished_steps(workdir)
        if not steps:
            problems.append(f"no checkpoint finished before the disk filled ({size_kb} KiB)")
        else:
            try:
                got = read_checkpoint(os.path.join(workdir, "checkpoints", str(steps[-1])))
                diff = compare_checkpoints(ref.checkpoint(steps[-1]), got)
                problems += [f"checkpoint {steps[-1]}: {d}" for d in diff]
            except Exception as e:  # an unreadable checkpoint is a finding, not a harness error
                problems.append(f"checkpoint {steps[-1]} unreadable ({type(e).__name__}: {str(e)[:80]})")
        return _outcome(name, problems, f"exit 1 on a {size_kb} KiB disk: '{last}'; checkpoint {steps[-1:]} intact")
    finally:
        if subprocess.run(["umount", mount], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mount], capture_output=True)


def _du_kb(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total // 1024 + 1


# -- the command line -----------------------------------------------------------------------------


def train_args(args: argparse.Namespace, corpus_glob: str | None, overrides: list[str]) -> list[str]:
    out = ["--config", args.config] if args.config else []
    out += [f"--config.train.steps={args.steps}", f"--config.train.checkpoint_every={args.checkpoint_every}",
            f"--config.train.eval_every={args.eval_every}", f"--config.train.log_every={args.log_every}"]
    if corpus_glob is not None:
        out += tiny_overrides(corpus_glob)
    return out + overrides


def summarize(trials: list[TrialResult]) -> list[str]:
    n = len(trials)
    identical = sum(t.identical for t in trials)
    state_ok = sum(not t.state_problems for t in trials)
    metrics_ok = sum(not t.metrics_problems for t in trials)
    kinds: dict[str, int] = {}
    for t in trials:
        for k in t.kills:
            kinds[k.split("@")[0]] = kinds.get(k.split("@")[0], 0) + 1
    hit = ", ".join(f"{k} {kinds[k]}" for k in KINDS if k in kinds)
    return [
        f"{identical}/{n} identical",
        f"  checkpoints (params, opt_state, data position) identical in {state_ok}/{n}; "
        f"metrics.jsonl identical in {metrics_ok}/{n}",
        f"  kills: {sum(kinds.values())}, at moments: {hit or 'none'}",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python tools/fault_inject.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5, help="kill trials (default 5)")
    p.add_argument("--max_kills", type=int, default=3, help="most SIGKILLs per trial (default 3)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}, or ''")
    p.add_argument("--config", default="", help="config file passed to the trainer")
    p.add_argument("--shape", choices=("tiny", "config"), default="tiny",
                   help="tiny: a small model on a generated corpus (default); config: as the config says")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint_every", type=int, default=10)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--log_every", type=int, default=1)
    p.add_argument("--workdir_root", default="", help="where runs go (default: a temporary directory, removed "
                                                       "at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of kill moments")
    p.add_argument("--sigterm_bound", type=float, default=10.0, help="seconds SIGTERM may take to exit")
    p.add_argument("--diverge_lr", default="1e6", help="the learning rate of the diverging restart")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; allowed: {', '.join(SCENARIOS)}")

    root = args.workdir_root or tempfile.mkdtemp(prefix="gptjax-fault-")
    corpus = write_corpus(os.path.join(root, "corpus")) if args.shape == "tiny" else None
    h = Harness(root, train_args(args, corpus, overrides), seed=args.seed)
    print(f"runs in {root}; trainer arguments: {' '.join(h.train_args)}", flush=True)
    try:
        ref = run_reference(h)
        print(f"reference: {ref.settings.steps} steps; a second uninterrupted run is identical and takes "
              f"{ref.duration:.1f} s", flush=True)
        trials = []
        for i in range(args.trials):
            trial = kill_trial(h, i, plan_trial(h.rng, i, args.max_kills))
            trials.append(trial)
            print(trial.line(), flush=True)
        outcomes = []
        for s in scenarios:
            outcome = {"sigterm": lambda: scenario_sigterm(h, args.sigterm_bound),
                       "sigterm-twice": lambda: scenario_sigterm_twice(h, args.sigterm_bound),
                       "sigterm-prepare": lambda: scenario_sigterm_early(h, "prepare", args.sigterm_bound),
                       "sigterm-compile": lambda: scenario_sigterm_early(h, "compile", args.sigterm_bound),
                       "truncated": lambda: scenario_truncated(h),
                       "diverge": lambda: scenario_diverge(h, args.diverge_lr),
                       "disk": lambda: scenario_disk(h)}[s]()
            outcomes.append(outcome)
            print(outcome.line(), flush=True)
        print()
        if trials:
            print("\n".join(summarize(trials)))
        for o in outcomes:
            print(o.line())
        failed = any(not t.identical for t in trials) or any(o.status == "FAILED" for o in outcomes)
        return 1 if failed else 0
    finally:
        h.close()
        if not args.workdir_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"runs kept in {root}")


if __name__ == "__main__":
    sys.exit(main())
