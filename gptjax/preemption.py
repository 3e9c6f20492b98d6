"""Preemption: SIGTERM / SIGINT stop a run cleanly, at any point of it.

Before the loop starts (data preparation, restoring, setting up) a first signal raises
`StopBeforeTraining`, a BaseException so that no `except Exception` swallows it, and the
`finally` blocks on its way out remove what was half built; there is nothing to save yet.
Once the loop is `armed`, a first signal only sets `requested`: the loop finishes the step it
is in, saves a checkpoint and exits. A second signal ends the process at once (exit status
128 + signal number) with one line: orbax renames a checkpoint into place only when it is
complete, so the newest complete checkpoint is what a restart uses.

On a multi-host run the signal may reach one host only: `any_host` tells every host whether
any of them was asked to stop, so all stop after the same step.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopBeforeTraining(BaseException):
    """A stop signal arrived before the training loop started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequested:
    """Within `with StopRequested() as stop:`, SIGTERM or SIGINT raise `StopBeforeTraining`
    until `arm()`, then turn `stop.requested` True; a second one exits the process at once."""

    def __init__(self) -> None:
        self.requested = False
        self.armed = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        for sig in SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def arm(self) -> None:
        """From now on a first signal is a request the loop reads between steps."""
        self.armed = True

    def agreed(self, at_log_step: bool) -> bool:
        """Whether the loop stops for a request after the step it just ran. A pod's hosts agree
        on it at log steps (a collective, `any_host`), so that all stop after the same step; a
        single process stops at once."""
        if jax.process_count() == 1:
            return self.requested
        return at_log_step and any_host(self.requested)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            name = signal.Signals(signum).name
            print(f"{name} again: exiting now without saving; the newest complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = True
        if not self.armed:
            raise StopBeforeTraining(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def any_host(flag: bool) -> bool:
    """Whether `flag` is set on any host (every host must call this at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))
