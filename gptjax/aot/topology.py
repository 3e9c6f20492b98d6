"""TPU slices by name: 'v5e:2x2' -> the chip's figures and libtpu's compile-only devices.

libtpu describes the devices of a slice (`jax.experimental.topologies`) without any TPU
attached; programs lowered for them compile with the TPU compiler on any machine.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import jax

from gptjax.chips import TPUS, Chip
from gptjax.errors import UserError

INSTALL_HINT = 'pip install -e ".[tpu]" (or pip install "jax[tpu]==0.10.2")'
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v6e:2x4, v4:2x2x1, v5p:2x2x2"
_HOST_BOUNDS = (2, 2, 1)  # chips per host on multi-host slices (v4, v5p, and v5e/v6e pods)


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """The chip and the shape of a topology name ('v5e:2x2': v5e, (2, 2)); a UserError names
    the known chips and gives examples."""
    m = re.fullmatch(r"(v[0-9a-z]+):(\d+(?:x\d+){1,2})", name.strip().lower())
    if not m or m.group(1) not in TPUS:
        raise UserError(
            f"unknown TPU topology {name!r}; give CHIP:SHAPE with CHIP one of {', '.join(TPUS)}, "
            f"e.g. {TOPOLOGY_EXAMPLES}"
        )
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if any(d < 1 for d in dims):
        raise UserError(f"topology {name!r} has a zero dimension; e.g. {TOPOLOGY_EXAMPLES}")
    return TPUS[m.group(1)], dims


def libtpu_installed() -> bool:
    """Whether libtpu, which compiles for TPU topologies, can be imported."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> tuple[Chip, list[jax.Device]]:
    """The chip and the compile-only devices of a TPU slice, described by libtpu."""
    chip, dims = parse_topology(name)
    if not libtpu_installed():
        raise UserError(f"compiling for TPU needs libtpu, which is not installed: {INSTALL_HINT}")
    from jax.experimental import topologies

    # libtpu's lock file guards the chips of a TPU VM; compiling touches none, and another
    # process (a run in training, a second check) may hold the lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims3 = dims + (1,) * (3 - len(dims))
    kwargs: dict[str, Any] = {"chips_per_host_bounds": tuple(min(d, h) for d, h in zip(dims3, _HOST_BOUNDS))}
    if chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(topology_name=f"{chip.name}:{'x'.join(map(str, dims))}", platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        if "INVALID_ARGUMENT" not in str(e):  # not a refused shape: libtpu itself failed
            raise
        first = str(e).strip().splitlines()[0]
        raise UserError(f"libtpu has no TPU topology {name!r} ({first}); e.g. {TOPOLOGY_EXAMPLES}") from None
    return chip, list(desc.devices)
