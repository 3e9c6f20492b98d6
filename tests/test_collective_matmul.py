"""`model.collective_matmul`: the train step's compiler options on each platform
(`gptjax.step.train_compiler_options`) and the setting's validation."""

from __future__ import annotations

import types

import numpy as np
import pytest

from gptjax.errors import UserError
from gptjax.model import GPTConfig
from gptjax.step import NO_WINDOWED_EINSUM, train_compiler_options


def _mesh(platform: str) -> types.SimpleNamespace:
    """A stand-in for a mesh whose devices are on `platform` (only its devices are read)."""
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)] * 4).reshape(2, 2))


def test_windowed_einsums_are_turned_off_only_on_a_tpu_when_asked():
    on, off = GPTConfig(vocab_size=64), GPTConfig(vocab_size=64, collective_matmul=False)
    assert on.collective_matmul is True  # the default keeps the compiler's choice
    assert train_compiler_options(_mesh("tpu"), on) is None
    assert train_compiler_options(_mesh("tpu"), off) == NO_WINDOWED_EINSUM
    assert NO_WINDOWED_EINSUM["xla_jf_spmd_threshold_for_windowed_einsum_mib"] >= 1_000_000
    for platform in ("cpu", "gpu"):  # a TPU compiler flag: never passed elsewhere
        for gpt in (on, off):
            options = train_compiler_options(_mesh(platform), gpt) or {}
            assert not set(options) & set(NO_WINDOWED_EINSUM)
    assert train_compiler_options(_mesh("cpu"), off) == train_compiler_options(_mesh("cpu"), on) is not None


def test_collective_matmul_must_be_a_bool():
    with pytest.raises(UserError, match="model.collective_matmul must be true or false"):
        GPTConfig(vocab_size=64, collective_matmul="no")
