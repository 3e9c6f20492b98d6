"""What data preparation tells the user: lines and a progress bar on stderr, from process 0 only."""

from __future__ import annotations

import os
import sys
from typing import Any


def short_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else as given."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


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
        """A tqdm bar (a no-op one on other processes); `unit` 'B' counts bytes with k/M/G prefixes."""
        from tqdm import tqdm

        in_bytes = unit == "B"
        return tqdm(desc=desc, total=total, unit=unit, unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000,
                    file=sys.stderr, disable=not self.enabled, leave=False, dynamic_ncols=True)
