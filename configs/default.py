"""The built-in CPU demo: a small GPT learns to write Python from the standard library's source.

Runs in a few minutes on 2 CPU cores, tokenizer training and compilation included:

    python -m gptjax.train                  # in runs/default
"""

from gptjax.config import base_config


def get_config():
    return base_config()
