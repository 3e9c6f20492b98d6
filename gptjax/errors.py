"""The one error class for user mistakes.

Anything a user can get wrong (a config value, a path, a prompt) raises `UserError` with a
message that says what was wrong and what is allowed. The CLIs print it as one line and exit
with status 2; everything else is a bug and keeps its traceback, except a reader that went
away (`python -m gptjax.sample ... | head`): a quiet exit with status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in the user's input: config, command line, data or paths."""


def fail(message: str) -> NoReturn:
    """Print `error: message` on one line to stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(main: Callable[[], T]) -> T:
    """Run a CLI entry point, turning a `UserError` into one line and exit status 2, and a
    closed standard output (the reader of a pipe stopped reading) into a quiet exit, status 1."""
    try:
        return main()
    except UserError as e:
        fail(str(e))
    except BrokenPipeError:
        # Python flushes stdout once more at exit: send that to /dev/null, not to a second error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
