"""What keeps a run alive: the non-finite guard, checkpoint fallback, metrics without repeats,
stop signals, and failed writes as one line (the end-to-end versions are in test_fault_inject)."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import checkpoint as ckpt
from gptjax import config as C
from gptjax import optim as optim_lib
from gptjax import loop, sharding, train
from gptjax.errors import UserError
from gptjax.layout import RunDir
from gptjax.metrics import MetricsFiles, MetricsWriter, open_metrics, truncate_metrics
from gptjax.schema import WandbConfig
from gptjax.model import GPTConfig
from gptjax.preemption import StopBeforeTraining, StopRequested
from gptjax.state import param_shapes
from gptjax.step import build_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def steps():
    gpt = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16)
    optim = optim_lib.make_optimizer(C.sections(C.base_config()).optim, param_shapes(gpt), 100)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return build_steps(gpt, optim, mesh, seed=0)


def _batch(weight=1.0):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(4, 17))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.full((4, 16), weight, np.float32)}


def _host(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_non_finite_step_leaves_params_and_optimizer_state_and_advances_the_step(steps):
    state = steps.init_state()
    before = _host((state.params, state.opt_state))
    state, m = steps.train_step(state, _batch(weight=np.nan))
    assert int(state.step) == 1 and int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    for a, b in zip(before, _host((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert steps.all_finite(state)
    state, m = steps.train_step(state, _batch())
    assert int(state.step) == 2 and int(m["skipped"]) == 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, _host(state.params)))


def test_all_finite_sees_a_nan_anywhere_in_the_state(steps):
    state = steps.init_state()
    poisoned = jax.tree_util.tree_map(lambda x: x, state)
    leaves, treedef = jax.tree_util.tree_flatten(poisoned.opt_state)
    i = next(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating) and x.size)
    leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].set(jnp.nan)
    poisoned = poisoned.replace(opt_state=jax.tree_util.tree_unflatten(treedef, leaves))
    assert steps.all_finite(state) and not steps.all_finite(poisoned)


def test_bad_steps_stop_only_after_the_limit_in_a_row():
    bad = loop.BadSteps(limit=3, total=2)
    assert [bad.observe(s) for s in (1, 1, 0, 1, 1, 1)] == [False, False, False, False, False, True]
    assert bad.total == 7 and bad.streak == 3


def test_max_bad_steps_is_validated():
    c = C.base_config()
    c.train.max_bad_steps = 0
    with pytest.raises(UserError, match="max_bad_steps"):
        C.sections(c)


def _save_steps(run_dir, steps):
    checkpointer = ckpt.Checkpointer(run_dir, keep=10, async_save=False)
    for s in steps:
        checkpointer.save(s, {"w": jnp.full((8, 8), float(s))}, {"mu": jnp.zeros((8,))}, skipped_steps=s // 10)
    checkpointer.close()


def _cut_files(directory):
    for dirpath, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(dirpath, f)
            os.truncate(path, os.path.getsize(path) // 2)


def _abstract():
    s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=s)}, {"mu": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=s)}


def test_a_damaged_newest_checkpoint_is_reported_once_set_aside_and_the_previous_used(tmp_path, capsys):
    run_dir = RunDir.at(str(tmp_path / "run"))
    _save_steps(run_dir, [10, 20, 30])
    _cut_files(run_dir.checkpoint(30))
    checkpointer = ckpt.Checkpointer(run_dir, keep=10)
    params, _, data = checkpointer.restore_latest(*_abstract())
    checkpointer.close()
    assert data == {"step": 20, "skipped_steps": 2}
    assert float(params["w"][0, 0]) == 20.0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and "checkpoint 30" in lines[0] and "trying checkpoint 20" in lines[0], lines
    assert run_dir.steps() == [10, 20]  # nothing deleted: the damaged one was moved
    assert os.path.isdir(os.path.join(run_dir.root, "unreadable", "30"))


def test_dry_run_reads_without_moving_and_all_unreadable_is_one_user_error(tmp_path, capsys):
    run_dir = RunDir.at(str(tmp_path / "run"))
    _save_steps(run_dir, [10, 20])
    _cut_files(run_dir.checkpoint(20))
    checkpointer = ckpt.Checkpointer(run_dir, keep=10)
    assert checkpointer.restore_latest(*_abstract(), set_aside=False)[2]["step"] == 10
    assert run_dir.steps() == [10, 20]
    _cut_files(run_dir.checkpoint(10))
    with pytest.raises(UserError, match="no checkpoint .* can be read"):
        checkpointer.restore_latest(*_abstract(), set_aside=False)
    checkpointer.close()


def test_metrics_after_the_restored_step_are_dropped_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)] + [{"step": 5, "val_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "lo')  # cut by a kill
    truncate_metrics(str(path), 5)
    kept = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 5]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def _events(path):
    """The Event protos of a TensorBoard events file (TFRecord: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out, data = [], open(path, "rb").read()
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        out.append(Event.FromString(data[12 : 12 + n]))
        data = data[16 + n :]
    return out


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from gptjax import storage

    path = tmp_path / "config.json"
    storage.write_text(str(path), "old")
    storage.write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        storage.write_text(str(path), "newer")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_a_resumed_writer_starts_a_purging_events_file_and_appends_after_the_restored_step(tmp_path):
    run_dir = RunDir.at(str(tmp_path))
    writer = open_metrics(run_dir, MetricsFiles(run_dir.metrics), 0, WandbConfig(), {})
    for s in range(1, 8):
        writer.write(s, {"loss": float(s)})
    writer.close()
    writer = open_metrics(run_dir, MetricsFiles(run_dir.metrics), 4, WandbConfig(), {})
    writer.write(5, {"loss": 50.0})
    writer.close()
    assert [json.loads(l)["step"] for l in open(run_dir.metrics)] == [1, 2, 3, 4, 5]
    files = sorted(os.listdir(run_dir.tensorboard))
    assert len(files) == 2
    events = _events(os.path.join(run_dir.tensorboard, files[-1]))
    purges = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert purges == [5]


def test_a_sink_that_fails_to_close_leaves_the_others_closed_and_uploaded(tmp_path, capsys):
    """A failing TensorBoard close is one line; the tracker still finishes and the local copies
    of a bucket's metrics.jsonl and events are still uploaded (here to a local directory standing
    for the bucket)."""
    closed = []

    class Tracker:
        def write(self, step, metrics):
            pass

        def close(self):
            closed.append("tracker")

    local = tmp_path / "copy" / "metrics.jsonl"
    local.parent.mkdir()
    uploaded = tmp_path / "bucket" / "metrics.jsonl"
    uploaded.parent.mkdir()
    (tmp_path / "bucket" / "tb").mkdir()
    writer = MetricsWriter(str(local), str(tmp_path / "bucket" / "tb"), 0, Tracker(), str(uploaded))

    def broken_close():
        raise OSError("events file gone")

    writer.tb.close = broken_close
    writer.write(1, {"loss": 1.5})
    writer.close()
    assert closed == ["tracker"]
    assert [json.loads(l) for l in open(uploaded)] == [{"step": 1, "loss": 1.5}]
    assert len(os.listdir(tmp_path / "bucket" / "tb")) == 1  # this attempt's events file, uploaded too
    assert not local.parent.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "while closing" in err[0] and "events file gone" in err[0]


def test_signals_before_training_raise_and_after_arming_set_the_flag():
    with StopRequested() as stop:
        with pytest.raises(StopBeforeTraining):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
    with StopRequested() as stop:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        assert stop.requested


def test_a_second_signal_exits_at_once_with_one_line():
    code = (
        "import os, signal, time\n"
        "from gptjax.preemption import StopRequested\n"
        "with StopRequested() as stop:\n"
        "    stop.arm()\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 128 + signal.SIGINT
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "SIGINT again" in lines[0]


def test_a_workdir_that_cannot_be_created_is_one_line_exit_1(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--workdir", str(blocker / "run"), "--config.data.source=stdlib",
                    "--config.tokenizer.vocab_size=300"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert exit_info.value.code == 1
    assert err[-1].startswith("error: preparing the run failed: Not a directory") and str(blocker) in err[-1]
    assert "MiB free there" in err[-1]


def test_a_full_disk_while_building_the_token_cache_is_one_line_exit_1(tmp_path, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True, text=True)
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(20):
        (corpus / f"doc{d}.txt").write_text("".join(f"def f{d}_{i}(x):\n    return x + {i}\n" for i in range(60)))
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--workdir", str(mount / "run"), f"--config.data.source=files:{corpus}/*.txt",
                        "--config.tokenizer.vocab_size=300"])
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert exit_info.value.code == 1
        assert err[-1].startswith("error: ") and "No space left on device" in err[-1] and str(mount) in err[-1]
        assert not any("Traceback" in l for l in err)
        assert not [n for n in os.listdir(mount / "run" / "data") if ".tmp" in n]
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
