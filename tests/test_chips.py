"""`gptjax.chips.chip_of`: each device kind JAX reports finds its chip's figures, which the
run's MFU is measured against (`gptjax.chips.peak_flops`)."""

import types

import pytest

from gptjax import chips


@pytest.mark.parametrize("kind, name, tflops", [
    ("TPU v4", "v4", 275.0),
    ("TPU v5 lite", "v5e", 197.0),
    ("TPU v5", "v5p", 459.0),  # v5p's device kind: no "p", and a prefix of v5e's
    ("TPU v6 lite", "v6e", 918.0),
    ("NVIDIA H100 80GB HBM3", "H100", 989.0),
    ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L4", "L4", 121.0),
])
def test_each_device_kind_finds_its_chip(kind, name, tflops):
    chip = chips.chip_of(kind)
    assert chip is not None and chip.name == name and chip.bf16_tflops == tflops


def test_a_cpu_or_unknown_device_has_no_chip():
    assert chips.chip_of("cpu") is None and chips.chip_of("TPU v9 future") is None


def test_the_runs_peak_is_its_chips_times_its_devices(monkeypatch):
    """On a v5p slice the peak is v5p's (not a matmul measured as on a CPU); configured wins."""
    device = types.SimpleNamespace(device_kind="TPU v5", platform="tpu")
    mesh = types.SimpleNamespace(devices=types.SimpleNamespace(flat=[device]), size=8)
    monkeypatch.setattr(chips, "measure_matmul_flops", lambda *a, **k: pytest.fail("measured on a TPU"))
    assert chips.peak_flops(0.0, mesh) == pytest.approx(459e12 * 8)
    assert chips.peak_flops(100.0, mesh) == pytest.approx(100e12 * 8)
