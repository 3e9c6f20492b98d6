"""Text generation: token filters, the jitted decoder, and the text API.

    filters.py  temperature, top-k and top-p (exactly transformers' warpers) and the draw
    plan.py     the host side of a call: prompts checked, lengths bucketed, contexts cropped
    decode.py   the jitted programs: prefill and decode loop over a KV cache, past the window
    decoder.py  `Decoder`: runs a call's programs, streams its tokens
    programs.py compiled programs kept on disk, so a new process samples at once
    api.py      `load` a run, `LoadedModel.generate` / `stream` text
"""

from gptjax.sampling.api import LoadedModel, load
from gptjax.sampling.decode import DecodeState
from gptjax.sampling.decoder import Decoder, Generation, generate_tokens
from gptjax.sampling.filters import check_controls, choose_tokens, filter_logits
from gptjax.sampling.plan import keep_length

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
