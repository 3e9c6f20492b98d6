"""The JAX process a command-line tool starts: which platforms JAX may use, the compilation
cache, quiet library threads, and the one way to print a progress line (process 0, stderr).

Importing this module imports nothing heavy; each function imports JAX when it needs it, so the
sampling CLI can still narrow JAX's import (see `gptjax.sample`).
"""

from __future__ import annotations

import glob
import os
import sys

_GOOGLE_PCI_VENDOR = "0x1ae0"  # every Cloud TPU chip is a PCI device of Google's
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def accelerator_present(pci_devices: str = "/sys/bus/pci/devices", device_files: tuple[str, ...] = _GPU_DEVICE_FILES) -> bool:
    """Whether this machine shows a TPU chip (a Google PCI device) or a GPU (NVIDIA or AMD
    device files), the checks JAX itself makes before starting those backends."""
    for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return any(os.path.exists(d) for d in device_files)


def cpu_unless_accelerated(**probe: object) -> bool:
    """Keep JAX on the CPU where no accelerator exists; True if it did so.

    With libtpu installed (the `aot` and `test` extras bring it), JAX tries a TPU backend in
    every process, and on a machine without a TPU that prints libtpu's TPU_WORKER_HOSTNAMES
    errors and costs start-up time and memory. Where the user chose no platforms (JAX_PLATFORMS
    / jax_platforms) and `accelerator_present(**probe)` is False, the platforms become 'cpu';
    on a TPU VM or a GPU machine nothing changes. Call it before JAX's backends start.
    """
    if os.environ.get("JAX_PLATFORMS"):
        return False
    if "jax" in sys.modules and sys.modules["jax"].config.jax_platforms:
        return False
    if accelerator_present(**probe):  # type: ignore[arg-type]
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is imported ...
    if "jax" in sys.modules:  # ... or, once it is, from its config
        sys.modules["jax"].config.update("jax_platforms", "cpu")
    return True


def enable_compilation_cache(store_all: bool = False) -> None:
    """Keep compiled programs on disk, so a resumed or repeated run skips most compilation.

    JAX_COMPILATION_CACHE_DIR chooses the place (empty: off); the default is ~/.cache/gptjax/xla.
    JAX stores only programs that took at least a second to compile; `store_all` stores every
    one (the sampler's small programs compile faster than that, yet are most of a short run).
    """
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gptjax/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        if store_all:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def quiet_background_errors() -> None:
    """Errors in library threads (orbax's asynchronous saves, tensorboardX's event writer) print
    no traceback of their own. They reach the main thread (orbax's wait and save, the writer's
    close), which reports them in one line."""
    import logging
    import threading

    from absl import logging as absl_logging

    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    absl_logging.set_verbosity(absl_logging.FATAL)


def log(message: str) -> None:
    """A progress or status line on stderr, from process 0 only (a pod's other hosts are quiet)."""
    import jax

    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
