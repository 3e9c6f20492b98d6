"""`python -m gptjax.aot`: see `gptjax.aot.cli`."""

import sys

from gptjax.aot.cli import main

sys.exit(main())
