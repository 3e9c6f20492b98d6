"""Weights & Biases as a metrics sink (`gptjax.metrics`), in W&B's offline mode (no network).

A tiny run trained in two parts (stopped at step 10, then resumed) with `wandb.enabled=True`
must leave offline run directories under WANDB_DIR holding the config and every metrics line
of metrics.jsonl, all under one run id, the one kept in the workdir. The offline run files
(`run-<id>.wandb`) are W&B's record log: 32 KiB blocks of length-prefixed protobuf `Record`s
after a 7-byte header, read here with W&B's own protobuf classes.
"""

from __future__ import annotations

import glob
import json
import os
import string
import struct

import jax
import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from gptjax import config as config_lib  # noqa: E402
from gptjax import metrics, train  # noqa: E402
from gptjax.errors import UserError  # noqa: E402
from gptjax.layout import RunDir  # noqa: E402
from gptjax.outputs import write_run_files  # noqa: E402
from gptjax.run import resolve  # noqa: E402

_BLOCK = 32 * 1024
_FULL, _LAST = 1, 4


def _records(path: str) -> list:
    """The protobuf records of a W&B run file (its LevelDB-style log)."""
    with open(path, "rb") as f:
        data = f.read()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    out, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
            parts = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _offline_run(directory: str) -> tuple[str, dict, dict[int, dict[str, float]]]:
    """(run id, config, {step: metrics}) of one offline run directory."""
    [path] = glob.glob(os.path.join(directory, "run-*.wandb"))
    run_id, config, history = "", {}, {}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config = {_key(i): json.loads(i.value_json) for i in r.run.config.update if _key(i) != "_wandb"}
        elif kind == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            history[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, config, history


@pytest.fixture
def offline(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.makedirs(tmp_path / "wandb-dir")
    return str(tmp_path / "wandb-dir")


def test_offline_run_holds_config_and_every_step_across_a_resume(trained_run, tmp_path, offline: str) -> None:
    workdir = trained_run.tokenizer_only(tmp_path / "run")
    c = trained_run.config(peak_tflops=1.0)  # MFU against a given peak: no matmul timed at each start
    c.wandb.update(enabled=True, project="gptjax-test")
    train.run(c, workdir, devices=jax.devices()[:1], stop_at=10)
    run_id = open(RunDir.at(workdir).wandb_run_id).read().strip()
    train.run(c, workdir, devices=jax.devices()[:1])
    wandb.teardown()  # W&B's service process completes the last run's file when it stops

    runs = sorted(glob.glob(os.path.join(offline, "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)
    logged: dict[int, dict[str, float]] = {}
    for directory in runs:
        rid, config, history = _offline_run(directory)
        assert rid == run_id
        assert config["train"]["steps"] == 20 and config["model"]["n_embd"] == 32
        assert config["wandb"]["project"] == "gptjax-test"
        for step, metrics in history.items():
            logged.setdefault(step, {}).update(metrics)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        expected: dict[int, dict[str, float]] = {}
        for line in f:
            record = json.loads(line)
            expected.setdefault(record.pop("step"), {}).update(record)
    assert sorted(logged) == sorted(expected) == list(range(1, 21))
    for step, metrics in expected.items():
        assert logged[step] == pytest.approx(metrics), step
    assert "val_loss" in logged[10] and "val_loss" in logged[20]


def test_the_run_id_is_written_once_by_process_zero_and_other_processes_write_nothing(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_lib.base_config()
    config.wandb.enabled = True
    r = resolve(config, str(tmp_path / "run"), jax.devices()[:1])
    os.makedirs(r.run_dir.root)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert write_run_files(r) is None
    writer = metrics.open_metrics(r.run_dir, None, 0, r.sections.wandb, {})
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert writer.tracker is None and os.listdir(r.run_dir.root) == []
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    first = write_run_files(r)
    assert first is not None and first.path == r.run_dir.metrics and first.upload_to is None
    assert len(first.wandb_run_id) == 8 and set(first.wandb_run_id) <= set(string.ascii_lowercase + string.digits)
    assert sorted(os.listdir(r.run_dir.root)) == ["config.json", "wandb_run_id"]
    assert write_run_files(r).wandb_run_id == first.wandb_run_id  # a retry continues the same W&B run


def test_bad_settings_are_one_line_and_status_2(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(UserError, match="wandb.project"):
        config_lib.WandbConfig(enabled=True, project=" ")
    for argv in (["--config.wandb.mode=bogus"], ["--config.wandb.enabled=True"]):
        if argv == ["--config.wandb.enabled=True"]:
            monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
        with pytest.raises(SystemExit) as e:
            train.main(["--workdir", str(tmp_path / "run"), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: wandb.")
    assert "gptjax[wandb]" in err[0]
