"""Turning a run's failures into one line: `RunFailed` and the facts it states (what failed,
why, where, and the free space there), and the disk check before a save.

The training CLI prints a RunFailed as `error: ...` and exits with status 1; the checkpoints
already written stay intact.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax

from gptjax.checkpoint import describe_error
from gptjax.storage import is_url
from gptjax.runtime import log


class RunFailed(Exception):
    """The run cannot go on (it diverged, or a write failed); the CLI prints the message as
    one line and exits with status 1. The checkpoints already written are intact."""


def io_failure(what: str, e: BaseException, path: str) -> RunFailed:
    """A one-line RunFailed for a failed read or write: what, why, where, and the free space there."""
    where = getattr(e, "filename", None) or path
    reason = e.strerror if isinstance(e, OSError) and e.strerror else describe_error(e)
    return RunFailed(f"{what} failed: {reason} ({where}{_free_space(str(where))})")


def check_space(step: int, state: Any, directory: str, last_good: str) -> None:
    """Refuse to start a save that cannot fit: a checkpoint takes about the bytes of the train
    state (`params` and `opt_state`) this host writes, and the older ones stay until it is complete."""
    free = free_bytes(directory)
    if free is None:
        return
    need = sum(x.nbytes for x in jax.tree_util.tree_leaves((state.params, state.opt_state))) / jax.process_count()
    if free < need * 1.02 + 2**16:  # orbax adds a little metadata to the arrays' bytes
        raise RunFailed(
            f"saving checkpoint {step}: not enough space ({directory}: {free / 2**20:.1f} MiB free, "
            f"a checkpoint takes about {need / 2**20:.1f} MiB); not saved; {last_good}"
        )


def free_bytes(path: str) -> int | None:
    """Free bytes on the local file system that holds `path` (or its nearest existing parent)."""
    if is_url(path):
        return None
    directory = os.path.abspath(path)
    while not os.path.exists(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _free_space(path: str) -> str:
    free = free_bytes(path)
    return "" if free is None else f"; {free / 2**20:.1f} MiB free there"


def close_quietly(close: Callable[[], None]) -> None:
    """Close, reporting a failure in one line; the run's own outcome stays the error, if any."""
    try:
        close()
    except Exception as e:  # the first failure is already being reported, or the data is on disk
        log(f"while closing: {describe_error(e)}")
