"""`python -m gptjax.lm_eval`: lm-eval's command line, with the `gptjax` model registered.

    python -m gptjax.lm_eval --model gptjax --model_args workdir=runs/x --tasks hellaswag

Every argument is lm-eval's (`lm-eval --help`); see `gptjax.lm_eval` for why the plain
`lm_eval` command cannot name the model. Without lm-eval installed it prints one line and
exits with status 2.
"""

from __future__ import annotations

import sys

from gptjax import runtime
from gptjax.errors import UserError, run_cli


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError:
            raise UserError("lm-eval is not installed: pip install 'gptjax[lm_eval]'") from None
        runtime.cpu_unless_accelerated()  # before JAX starts its backends
        import gptjax.lm_eval  # noqa: F401  registers the model

        if argv is not None:
            sys.argv = [sys.argv[0], *argv]
        sys.argv[0] = "lm-eval"
        cli_evaluate()

    run_cli(body)


if __name__ == "__main__":
    main()
