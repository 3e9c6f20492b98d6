"""Data prepared once per pod: host 0 builds the tokenizer and token caches, the others wait.

Every host of a pod runs the same preparation against the same shared location (the workdir,
or data.cache_dir). Host 0 trains the tokenizer and writes each token cache there; the other
hosts wait for each finished item and then read it. While host 0 prepares it keeps a status
file in the run's data directory fresh (a heartbeat); when it fails it writes its error there.
A waiting host stops with one line when host 0 reports a failure, or when host 0 has shown no
sign of progress for `data.host_wait_s` seconds (host 0 killed, or a location not shared).

One writer keeps the cache byte-identical whatever the number of hosts, needs no merging of
partial files in a bucket, and costs little wall time: encoding already uses every core of
host 0, and the other hosts have nothing to train on before the data is ready.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Callable

from gptjax import storage
from gptjax.errors import UserError

STATUS_FILE = ".prepare-status.json"
# A failure reported earlier than this before a host began waiting belongs to an earlier
# attempt: the hosts of one attempt start together (jax.distributed.initialize joins them).
START_SKEW_S = 60.0


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process's place in the pod, where host 0 reports, and how long the others wait."""

    index: int
    count: int
    wait_s: float  # data.host_wait_s
    status: str  # host 0's status file, in the shared run directory

    @property
    def builds(self) -> bool:
        """Whether this process prepares data itself (host 0, or the only host)."""
        return self.index == 0 or self.count == 1

    @property
    def beat_s(self) -> float:
        """How often host 0 refreshes its status: often enough for a waiter to see it alive."""
        return min(10.0, self.wait_s / 10)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


class Beacon:
    """Host 0's status while it prepares: refreshed every `beat_s` seconds while the block runs,
    removed when the block succeeds, and replaced by the error when it fails. With a single
    host, or on a host that waits, it does nothing."""

    def __init__(self, hosts: Hosts):
        self._path = hosts.status if hosts.count > 1 and hosts.builds else None
        self._beat_s = hosts.beat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, state: dict) -> None:
        storage.write_text(self._path, json.dumps({**state, "host": 0, "time": time.time()}))

    def _beat(self) -> None:
        beat = 0
        while not self._stop.wait(self._beat_s):
            beat += 1
            try:
                self._write({"state": "preparing", "beat": beat})
            except Exception:  # a missed beat only shortens the waiters' patience; preparation goes on
                pass

    def __enter__(self) -> "Beacon":
        if self._path is not None:
            storage.makedirs(os.path.dirname(self._path))
            self._write({"state": "preparing", "beat": 0})
            self._thread = threading.Thread(target=self._beat, daemon=True, name="gptjax-data-beacon")
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._path is None:
            return
        self._stop.set()
        self._thread.join()
        if exc is None:
            storage.remove(self._path)
        else:
            self._write({"state": "failed", "error": _one_line(exc)})


def _read_status(path: str) -> tuple[str | None, dict]:
    try:
        text = storage.read_text(path)
    except (OSError, ValueError):
        return None, {}
    try:
        status = json.loads(text)
    except ValueError:
        return text, {}
    return text, status if isinstance(status, dict) else {}


def wait_for(ready: Callable[[], bool], item: str, what: str, hosts: Hosts) -> None:
    """Return once `ready()` (`what`, at `item`, is complete); raise a one-line UserError when
    host 0 reports a failure, or shows no progress (its status unchanged) for `hosts.wait_s` s."""
    poll_s = min(1.0, hosts.wait_s / 20)
    started = time.time()
    last_change, seen = time.monotonic(), None
    while True:
        storage.refresh(item)
        if ready():
            return
        text, state = _read_status(hosts.status)
        if text != seen:
            seen, last_change = text, time.monotonic()
        failed = state.get("state") == "failed"
        if failed and float(state.get("time", 0)) >= started - START_SKEW_S:
            raise UserError(f"host {hosts.index}: host 0 failed to prepare the data, so {what} at {item} will not "
                            f"come: {state.get('error')}")
        if time.monotonic() - last_change > hosts.wait_s:
            earlier = f" (an earlier attempt of host 0 failed: {state.get('error')})" if failed else ""
            raise UserError(f"host {hosts.index}: waited {hosts.wait_s:g} s without progress for {what} at {item} "
                            f"that host 0 builds{earlier}; is host 0 running, can it write there, and do all hosts "
                            "share that location and the same input files? (data.host_wait_s sets the wait)")
        time.sleep(poll_s)
