"""tools/fault_inject.py, short: runs killed at chosen moments end bitwise equal to an
uninterrupted run, SIGTERM mid-step saves and exits 0; and the failures issue 10 fixes.
"""

import json
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import fault_inject as fi  # noqa: E402
from conftest import FAST_COMPILE  # noqa: E402

# Three checkpoints (the truncated and diverging scenarios need 3) with a step between any two
# that is neither one nor the step before one (where SIGTERM lands mid-interval), and an
# evaluation at each: every moment the harness aims at occurs, in few steps.
STEPS, EVERY, EVAL_EVERY = 15, 5, 5


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    corpus = fi.write_corpus(str(root / "corpus"))
    args = [f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
            f"--config.train.eval_every={EVAL_EVERY}", "--config.train.log_every=1", *fi.tiny_overrides(corpus)]
    # One device per core, as a user runs it (no device count in XLA_FLAGS), compiled as the
    # suite compiles (XLA's HLO passes all run): every run is compared with runs of the same flags.
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    h = fi.Harness(str(root), args, env=env, seed=0)
    fi.run_reference(h, repeat=False)  # the CLI checks run-to-run determinism; here it costs a run
    yield h
    h.close()


# One trial, three kills (each restart is a process start, the cost here). The evaluation killed
# is the first (step EVAL_EVERY), which also compiles the eval step: later ones take a few
# milliseconds here, and a loaded machine can finish one between two polls.
PLANS = [["prepare", f"eval@{EVAL_EVERY}", "save"]]


@pytest.fixture(scope="module")
def killed(harness):
    """A kill trial: during data preparation, then during the first evaluation, then during an
    asynchronous save."""
    return [fi.kill_trial(harness, i, plan) for i, plan in enumerate(PLANS)]


def test_killed_runs_end_with_bitwise_identical_checkpoints(killed):
    for trial, plan in zip(killed, PLANS):
        assert len(trial.kills) == len(plan), trial.line()
        assert trial.state_problems == [], trial.line()
    assert killed[0].kills[0] in ("prepare", "startup"), killed[0].line()  # before config.json


def test_metrics_jsonl_has_each_step_once_after_kills(killed):
    for trial in killed:
        assert trial.metrics_problems == [], trial.line()


def test_sigterm_mid_step_saves_exits_0_and_resumes_identically(harness):
    outcome = fi.scenario_sigterm(harness, bound_s=30.0)
    assert outcome.status == "ok", outcome.line()


def test_truncated_newest_checkpoint_falls_back_to_the_previous(harness):
    outcome = fi.scenario_truncated(harness)
    assert outcome.status == "ok", outcome.line()


def test_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(harness):
    outcome = fi.scenario_diverge(harness, lr="1e6")
    assert outcome.status == "ok", outcome.line()


def test_full_disk_is_one_line_exit_1_previous_checkpoint_intact(harness):
    outcome = fi.scenario_disk(harness)
    if outcome.status == "skipped":
        pytest.skip(outcome.why)
    assert outcome.status == "ok", outcome.line()


# -- the harness's own judgement, without training -------------------------------------------------


def _records(steps, eval_at=()):
    out = []
    for s in steps:
        out.append({"step": s, "loss": 1.0 / s, "lr": 0.1, "tokens_per_s": 1000.0 + s, "mfu": 0.1})
        if s in eval_at:
            out.append({"step": s, "val_loss": 2.0 / s, "val_ppl": 3.0})
    return out


def test_compare_metrics_ignores_timing_and_reports_repeats_and_changes():
    ref = _records(range(1, 11), eval_at=(5, 10))
    retimed = [dict(r, tokens_per_s=1.0, mfu=0.5) if "loss" in r else r for r in ref]
    assert fi.compare_metrics(ref, retimed) == []
    repeated = ref[:8] + _records(range(4, 11), eval_at=(5, 10))[1:]
    assert fi.compare_metrics(ref, repeated)[0].startswith("metrics.jsonl repeats")
    changed = json.loads(json.dumps(ref))
    changed[3]["loss"] += 1e-9
    assert fi.compare_metrics(ref, changed) == [f"metrics.jsonl values differ at steps {changed[3]['step']}"]
    assert "lacks steps 10" in fi.compare_metrics(ref, ref[:-2])[0]


def test_compare_checkpoints_is_bitwise():
    a = {"params": {"['w']": np.arange(6, dtype=np.float32)}, "data": {"step": 3}}
    b = {"params": {"['w']": np.arange(6, dtype=np.float32)}, "data": {"step": 3}}
    assert fi.compare_checkpoints(a, b) == []
    b["params"]["['w']"] = np.nextafter(b["params"]["['w']"], np.float32(9))
    assert "1 of 1 arrays differ" in fi.compare_checkpoints(a, b)[0]
    assert fi.compare_checkpoints(a, {**a, "data": {"step": 4}}) != []
    assert fi.all_finite({"params": {"['w']": np.array([1.0, np.nan])}}) == ["params['w']"]


def test_stderr_lines_drop_progress_bars():
    text = (" 10%|#  | 1/10 [00:01<00:09, 1.00step/s]\r 20%|## | 2/10 [00:02<00:08, 1.00step/s]\n"
            "step 10: val_loss 2.0\nerror: disk full at /x\n")
    assert fi.stderr_lines(text) == ["step 10: val_loss 2.0", "error: disk full at /x"]


def test_watch_classifies_moments_from_the_workdir(tmp_path):
    wd = tmp_path / "run"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / ".tokenizer.tmp-old").mkdir()  # left by an earlier, killed attempt: not this one's
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    watch = fi.Watch(str(wd), None, time.time_ns())

    def log(record):
        with open(wd / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    assert watch.moment() == "startup"
    (wd / "data").mkdir()
    (wd / "data" / ".files-123.tmp-x").mkdir()
    assert watch.moment() == "prepare"
    (wd / "data" / ".files-123.tmp-x").rmdir()
    train = {"steps": 20, "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10}
    (wd / "config.json").write_text(json.dumps({"train": train}))
    assert watch.moment() == "compile"
    log({"step": 1, "loss": 1.0})
    assert (watch.moment(), watch.last_step) == ("step", 1)
    log({"step": 10, "loss": 1.0})
    assert watch.moment() == "eval"
    log({"step": 10, "val_loss": 1.0})
    assert watch.moment() == "save"
    (wd / "checkpoints" / "10.orbax-checkpoint-tmp-5").mkdir()
    log({"step": 11, "loss": 1.0})
    assert (watch.moment(), watch.last_step) == ("save", 11)
    (wd / "checkpoints" / "10.orbax-checkpoint-tmp-5").rename(wd / "checkpoints" / "10")
    assert watch.moment() == "step"
    log({"step": 20, "loss": 1.0})
    log({"step": 20, "val_loss": 1.0})
    (wd / "checkpoints" / "20").mkdir()
    assert watch.moment() == "shutdown"
