"""The CLIs' JAX process set-up (`gptjax.runtime`): JAX stays on the CPU where no accelerator
exists, even with libtpu installed, and is left alone on a TPU VM or a GPU machine."""

import importlib.util
import os
import subprocess
import sys

import pytest

from gptjax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pci(tmp_path, *vendors: str) -> str:
    """A fake /sys/bus/pci/devices with one device per vendor id."""
    root = tmp_path / "pci"
    for i, vendor in enumerate(vendors):
        (root / f"0000:00:0{i}.0").mkdir(parents=True)
        (root / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def test_a_tpu_chip_or_a_gpu_counts_as_an_accelerator(tmp_path):
    assert not runtime.accelerator_present(_pci(tmp_path / "a", "0x8086", "0x10de"), device_files=())
    assert runtime.accelerator_present(_pci(tmp_path / "b", "0x8086", "0x1ae0"), device_files=())  # Google: a TPU
    gpu = tmp_path / "nvidia0"
    gpu.write_text("")
    assert runtime.accelerator_present(_pci(tmp_path / "c"), device_files=(str(gpu),))


def _probe(tmp_path, env: dict, vendors: tuple[str, ...]) -> subprocess.CompletedProcess:
    """A fresh process that calls cpu_unless_accelerated on a fake machine, then (on the CPU
    only: a TPU backend would be tried otherwise) starts JAX's backends."""
    code = (
        "import os, sys\n"
        "from gptjax import runtime\n"
        f"chose = runtime.cpu_unless_accelerated(pci_devices={_pci(tmp_path, *vendors)!r}, device_files=())\n"
        "print(chose, os.environ.get('JAX_PLATFORMS'))\n"
        "if chose:\n"
        "    import jax\n"
        "    print(jax.devices()[0].platform)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _env_without_platforms() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def test_no_accelerator_keeps_jax_on_the_cpu_without_a_tpu_start(tmp_path):
    proc = _probe(tmp_path, _env_without_platforms(), ("0x8086",))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "cpu", "cpu"]
    assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "libtpu" not in proc.stderr.lower(), proc.stderr


def test_a_tpu_vm_or_a_users_choice_is_left_alone(tmp_path):
    proc = _probe(tmp_path / "tpu", _env_without_platforms(), ("0x1ae0",))
    assert proc.stdout.split() == ["False", "None"], proc.stderr  # JAX picks the TPU itself
    chosen = {**_env_without_platforms(), "JAX_PLATFORMS": "cpu,tpu"}
    proc = _probe(tmp_path / "user", chosen, ("0x8086",))
    assert proc.stdout.split() == ["False", "cpu,tpu"], proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="the aot extra (libtpu) is not installed")
def test_the_train_cli_prints_no_libtpu_line_where_libtpu_is_installed(tmp_path):
    """The test environment has libtpu (the aot extra) and no TPU, as a user's CPU machine
    with that extra: the CLI neither starts a TPU backend nor prints its errors."""
    cmd = [sys.executable, "-m", "gptjax.train", "--workdir", str(tmp_path / "run"), "--dry_run"]
    proc = subprocess.run(cmd, env=_env_without_platforms(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wte" in proc.stdout  # the parameter table
    assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "libtpu" not in proc.stderr.lower(), proc.stderr


def test_the_metrics_writer_does_not_import_torch(tmp_path):
    """tensorboardX would import PyTorch (seconds) where it is installed; the run's writer loads
    without it, and torch still imports afterwards for whoever wants it."""
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from gptjax.metrics import summary_writer_class\n"
        f"w = summary_writer_class()({str(tmp_path / 'tb')!r})\n"
        "w.add_scalar('loss', 1.5, 1); w.close()\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.ones(2).sum().item())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "2.0"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
