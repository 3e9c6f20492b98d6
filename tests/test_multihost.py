"""Two hosts on localhost: `python -m gptjax.train` in 2 processes joined by jax.distributed
(a coordinator on 127.0.0.1, 4 CPU devices each, mesh data=2 fsdp=2 tensor=2 over all 8),
as a pod slice's hosts run it, on one shared workdir.

The 2-host run's losses equal a 1-process 8-device run's; its checkpoint resumes on 1
process with 8 devices and with 1 device, each continuing as the uninterrupted run does, and
`gptjax.load` samples from it. Host 1 prints nothing; host 0 logs plain lines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter

import jax
import numpy as np
from conftest import FAST_COMPILE
from fixtures.make_old_run import flat, write_corpus

import gptjax
from gptjax import checkpoint_read
from gptjax import config as config_lib
from gptjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST, STEPS = 5, 8  # the 2 hosts train to FIRST; the resumed runs continue to STEPS
TOL = 1e-4
# The CPU collectives library (gloo) prints its own lines, "[Gloo] Rank 1 is connected to 1 peer
# ranks. Expected number of connected peer ranks is : 1", from threads that interleave them
# character by character: no pattern can take their pieces out, but their characters can be.
GLOO_LINE = "[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"


def _chars(text: str) -> Counter:
    """The characters of `text` that do not vary between gloo's lines: no spaces, no digits."""
    return Counter(c for c in text if not c.isspace() and not c.isdigit())


def _not_gloo(text: str) -> dict[str, int]:
    """What of a host's output gloo did not print: how far its characters are from those of as
    many gloo lines as it holds '[' (a gloo line holds one), character by character. Empty when
    gloo printed all of it, in whatever order its threads interleaved the lines."""
    have, gloo = _chars(text), _chars(GLOO_LINE)
    want = Counter({c: n * text.count("[") for c, n in gloo.items()})
    return {c: have[c] - want[c] for c in set(have) | set(want) if have[c] != want[c]}


def _write_config(path, corpus: str) -> str:
    """A tiny run whose learning rate does not depend on train.steps (constant after 1 warm-up
    step), so a run of FIRST steps continued to STEPS is the uninterrupted run of STEPS."""
    path.write_text(
        "from gptjax.config import base_config\n\n\ndef get_config():\n"
        "    c = base_config()\n"
        f"    c.data.source = 'files:{corpus}'\n"
        "    c.data.val_fraction = 0.2\n"
        "    c.tokenizer.vocab_size = 300\n"
        "    c.model.update(n_layer=1, n_head=2, n_embd=16, block_size=16)\n"
        f"    c.train.update(steps={FIRST}, batch_size=8, seq_len=16, eval_batches=0, log_every=1,"
        f" checkpoint_every={FIRST}, peak_tflops=1.0)\n"  # MFU against a given peak: no matmul timed at each start
        "    c.optim.update(schedule='constant', warmup_steps=1)\n"
        "    c.mesh.update(data=2, fsdp=2, tensor=2)\n"
        "    return c\n"
    )
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_hosts(argv: list[str], n: int = 2, devices_per_host: int = 4, timeout_s: float = 900) -> list[tuple[str, str]]:
    """Run `python -m gptjax.train ARGV` as n hosts of one jax.distributed job; (stdout, stderr) per host."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # XLA's warnings as a user sees them
    env.update(
        # The suite's fast compiles (conftest: XLA's HLO passes, which decide the sharding, all run).
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_host} {FAST_COMPILE}",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES=str(n),
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p),
    )
    procs = [
        subprocess.Popen([sys.executable, "-m", "gptjax.train", *argv], env={**env, "JAX_PROCESS_ID": str(i)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout_s))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"host {i} exited with {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    return outputs


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _close(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps), got
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=0, atol=TOL)


def test_two_hosts_train_as_one_and_their_checkpoint_resumes_anywhere(tmp_path):
    config_path = _write_config(tmp_path / "tiny.py", write_corpus(str(tmp_path / "corpus")))
    config = config_lib.load_config(config_path)
    config.train.steps = STEPS

    # The uninterrupted run: 1 process, all 8 devices of this test process, the same mesh.
    reference = str(tmp_path / "reference")
    train.run(config, reference, devices=jax.devices()[:8])
    want = _losses(reference)
    assert sorted(want) == list(range(1, STEPS + 1))

    two_hosts = str(tmp_path / "two_hosts")
    (out0, err0), (out1, err1) = _run_hosts(["--config", config_path, "--workdir", two_hosts])
    _close(_losses(two_hosts), want, range(1, FIRST + 1))

    # Logs a pod can read: host 0 writes plain progress lines, host 1 nothing (gloo, the CPU
    # collectives library, prints its connection lines itself; a TPU pod has no gloo).
    assert f"workdir {two_hosts}: a new run" in out0 and f"done: step {FIRST}" in out0
    progress = [line for line in err0.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in progress] == [f"step {s}/{FIRST}" for s in range(1, FIRST + 1)]
    assert all("tokens/s, ETA " in line for line in progress) and "\r" not in err0
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu device(s)" in err0
    assert _not_gloo(out1 + err1) == {}, out1 + err1

    # The checkpoint the two hosts wrote holds the reference run's parameters at that step.
    _, theirs = checkpoint_read.load_for_inference(os.path.join(two_hosts, "checkpoints", str(FIRST)))
    _, mine = checkpoint_read.load_for_inference(os.path.join(reference, "checkpoints", str(FIRST)))
    for key, value in flat(mine).items():
        np.testing.assert_allclose(flat(theirs)[key], value, rtol=0, atol=1e-5, err_msg=key)

    # It resumes on 1 process with 8 devices, and with 1 device, continuing as the reference.
    for name, devices, mesh in (("resumed_8", 8, (2, 2, 2)), ("resumed_1", 1, (1, 1, 1))):
        workdir = str(tmp_path / name)
        shutil.copytree(two_hosts, workdir)
        config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        final = train.run(config, workdir, devices=jax.devices()[:devices])
        assert final["step"] == STEPS
        _close(_losses(workdir), want, range(1, STEPS + 1))

    # gptjax.load samples from the two hosts' checkpoint: greedy tokens as from the reference's.
    model = gptjax.load(two_hosts)
    ref_model = gptjax.load(os.path.join(reference, "checkpoints", str(FIRST)))
    prompt = [model.tokenizer.encode("def f")]
    tokens = model.generate_tokens(prompt, max_new_tokens=6, temperature=0.0, stop_tokens=())
    assert len(tokens[0]) == 6
    assert tokens == ref_model.generate_tokens(prompt, max_new_tokens=6, temperature=0.0, stop_tokens=())
    assert isinstance(model.generate("def f", max_new_tokens=4, temperature=0.8, seed=1)[0], str)
