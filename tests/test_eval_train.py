"""Benchmarks during training (the `eval` config section): logged per task in metrics.jsonl
and TensorBoard, and a stopped and resumed run reports what the uninterrupted shared run's
checkpoints score."""

from __future__ import annotations

import json
import os
import re
import struct

import jax
import pytest

from gptjax import config as config_lib
from gptjax import train
from gptjax.errors import UserError
from gptjax.evaluate import cli


def _events(directory: str) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every scalar in a TensorBoard directory's events files."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for name in sorted(os.listdir(directory)):
        data = open(os.path.join(directory, name), "rb").read()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12 : 12 + n])
            data = data[16 + n :]
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def _write_tasks(trained_run, tmp_path) -> tuple[str, str]:
    hs = tmp_path / "hs.jsonl"
    with open(hs, "w") as f:
        for i in range(6):
            f.write(json.dumps({"ctx": f"def f{i}_{i}(alpha):\n    return", "label": i % 3,
                                "endings": ["beta + 1", "gamma * 7\n", "kappa + 2", "sigma"]}) + "\n")
    other = tmp_path / "other"
    other.mkdir()
    for d in range(10):
        (other / f"d{d}.txt").write_text("".join(f"return omega + {i}  # sigma delta\n" for i in range(20 * d, 20 * d + 20)))
    return str(hs), f"files:{other}/*.txt"


def test_eval_tasks_are_logged_per_task_and_resume_with_the_same_values(trained_run, tmp_path):
    hs, source = _write_tasks(trained_run, tmp_path)
    workdir = trained_run.tokenizer_only(tmp_path / "run")
    c = trained_run.config(peak_tflops=1.0)  # MFU against a given peak: no matmul timed at each start
    c.eval.tasks = f"hellaswag:{hs}; bpb:{source}"
    train.run(c, workdir, devices=jax.devices()[:1], stop_at=10)
    train.run(c, workdir, devices=jax.devices()[:1])

    records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = {r["step"]: r for r in records if "eval/hs/acc" in r}
    keys = {"eval/hs/acc", "eval/hs/acc_norm", "eval/hs/items", "eval/files:*.txt/loss", "eval/files:*.txt/bpb"}
    assert sorted(logged) == [10, 20] and all(keys <= set(r) for r in logged.values())
    events = _events(os.path.join(workdir, "tb"))
    for step, r in logged.items():
        for k in keys:
            tag = re.sub(r"[^-/\w\.]", "_", k)  # tensorboardX's legal tag characters
            assert events[(tag, step)] == pytest.approx(r[k], rel=1e-6)
    # The uninterrupted shared run's last checkpoint, scored on the same tasks, gives what the
    # resumed run logged at that step.
    other = trained_run.copy(tmp_path / "straight")  # scoring another source caches it in the workdir
    m = cli.evaluate_run(os.path.join(other, "checkpoints", "20"), source=source, hellaswag=hs)
    assert logged[20]["eval/hs/acc"] == m["acc"] and logged[20]["eval/hs/acc_norm"] == m["acc_norm"]
    assert logged[20]["eval/files:*.txt/loss"] == pytest.approx(m["val_loss"], rel=1e-5)
    assert logged[20]["eval/files:*.txt/bpb"] == pytest.approx(m["val_bpb"], rel=1e-5)
    assert logged[20]["eval/files:*.txt/loss"] < logged[10]["eval/files:*.txt/loss"]


@pytest.mark.parametrize("tasks, message", [
    ("squad:x.jsonl", "bad task 'squad:x.jsonl'"),
    ("hellaswag:", "bad task 'hellaswag:'"),
])
def test_bad_tasks_are_refused_when_the_config_is_read(tasks, message):
    c = config_lib.base_config()
    c.eval.tasks = tasks
    with pytest.raises(UserError, match=message):
        config_lib.sections(c)


def test_a_missing_hellaswag_file_is_refused_before_anything_is_written(trained_run, tmp_path):
    c = trained_run.config()
    c.eval.tasks = f"hellaswag:{tmp_path / 'no_such.jsonl'}"
    with pytest.raises(UserError, match="does not exist .*curl -L --create-dirs -o data/hellaswag_val.jsonl"):
        train.run(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()
