"""What data preparation tells the user: lines and progress on stderr, from process 0 only.

On a terminal progress is a tqdm bar; otherwise (a pod's log, a file, a pipe) it is plain
lines, one every LINE_EVERY_S seconds, which read well in a log without carriage returns.
Both count the input read (`update`) and the characters encoded (`chars`), and show the rate
of each and the time left.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from gptjax import storage

LINE_EVERY_S = 30.0


def short_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else as given (URLs too)."""
    if storage.is_url(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _amount(n: float, unit: str) -> str:
    from tqdm import tqdm

    if unit == "B":
        size = tqdm.format_sizeof(n, divisor=1024)
        return size[:-1] + size[-1].upper() + "iB" if size[-1].isalpha() else size + " B"
    return f"{int(n):,} {unit}"


class _Lines:
    """A progress report as plain lines: one when it starts, then at most one per `every_s` seconds."""

    def __init__(self, say: Any, desc: str, total: int | None, unit: str, every_s: float):
        self._say, self._desc, self._total, self._unit, self._every_s = say, desc, total, unit, every_s
        self._done = self._chars = 0
        self._start = self._last = time.monotonic()

    def __enter__(self) -> "_Lines":
        size = f" ({_amount(self._total, self._unit)})" if self._total else ""
        self._say(f"{self._desc}{size}")
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def chars(self, n: int) -> None:
        self._chars += n

    def update(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last < self._every_s:
            return
        self._last = now
        rate = self._done / max(now - self._start, 1e-9)
        done = _amount(self._done, self._unit)
        chars = f", {chars_rate(self._chars, now - self._start)}" if self._chars else ""
        if self._total:
            eta = (self._total - self._done) / rate if rate > 0 else float("inf")
            self._say(f"{self._desc}: {done} of {_amount(self._total, self._unit)} "
                      f"({100 * self._done / self._total:.0f}%), {_amount(rate, self._unit)}/s{chars}, ETA {eta:.0f} s")
        else:
            self._say(f"{self._desc}: {done}, {_amount(rate, self._unit)}/s{chars}")


def chars_rate(chars: int, seconds: float) -> str:
    """'12.3M characters/s'."""
    return f"{chars / max(seconds, 1e-9) / 1e6:.1f}M characters/s"


class _Bar:
    """A tqdm bar that also shows characters encoded per second."""

    def __init__(self, bar: Any):
        self._bar, self._chars, self._start = bar, 0, time.monotonic()

    def __enter__(self) -> "_Bar":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def chars(self, n: int) -> None:
        self._chars += n
        if not self._bar.disable:
            self._bar.set_postfix_str(chars_rate(self._chars, time.monotonic() - self._start), refresh=False)


class Progress:
    """Prints to stderr on process 0 (jax.process_index() == 0 unless `enabled` says otherwise)."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled

    def say(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)

    def bar(self, desc: str, total: int | None, unit: str) -> Any:
        """A tqdm bar on a terminal, else plain lines (nothing on other processes); `unit` 'B'
        counts bytes with k/M/G prefixes. `update(n)` counts input, `chars(n)` characters encoded."""
        if self.enabled and not sys.stderr.isatty():
            return _Lines(self.say, desc, total, unit, LINE_EVERY_S)
        from tqdm import tqdm

        in_bytes = unit == "B"
        return _Bar(tqdm(desc=desc, total=total, unit=unit, unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000,
                         file=sys.stderr, disable=not self.enabled, leave=False, dynamic_ncols=True))
