"""gptjax: train, fine-tune and sample GPT-style causal Transformers with JAX and Flax."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: str, **kwargs: Any) -> Any:
    """Load a run directory or checkpoint for sampling; see `gptjax.sampling.load`."""
    from gptjax.sampling import load as _load

    return _load(path, **kwargs)
