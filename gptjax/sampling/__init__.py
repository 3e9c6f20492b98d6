"""Text generation: token filters, the jitted decoder, and the text API.

    filters.py  temperature, top-k and top-p (exactly transformers' warpers) and the draw
    decode.py   prefill + decode loop over a KV cache (`Decoder`), generation past the window
    api.py      `load` a run, `LoadedModel.generate` / `stream` text
"""

from gptjax.sampling.api import LoadedModel, load
from gptjax.sampling.decode import Decoder, DecodeState, Generation, generate_tokens, keep_length
from gptjax.sampling.filters import check_controls, choose_tokens, filter_logits

__all__ = [
    "DecodeState",
    "Decoder",
    "Generation",
    "LoadedModel",
    "check_controls",
    "choose_tokens",
    "filter_logits",
    "generate_tokens",
    "keep_length",
    "load",
]
