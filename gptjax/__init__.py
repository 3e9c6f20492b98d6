"""gptjax: train, fine-tune and sample GPT-style causal Transformers with JAX and Flax."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax
    from jax.sharding import Mesh

    from gptjax.sampling import LoadedModel

__version__ = "0.1.0"


def load(path: str, device: "jax.Device | None" = None, mesh: "Mesh | None" = None) -> "LoadedModel":
    """Load a run directory or checkpoint for sampling; see `gptjax.sampling.load`.

    Imports JAX on first call, so `import gptjax` stays light.
    """
    from gptjax.sampling import load as _load

    return _load(path, device=device, mesh=mesh)
