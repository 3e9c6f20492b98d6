"""Preemption: SIGTERM / SIGINT become a flag the training loop reads between steps.

The loop finishes the step it is in, saves a checkpoint and exits; a second signal stops at
once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
from typing import Any


class StopRequested:
    """Within `with StopRequested() as stop:`, `stop.requested` turns True on SIGTERM or SIGINT."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
