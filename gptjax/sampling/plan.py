"""The host-side plan of a sampling call: prompts checked, lengths bucketed, contexts cropped.

Everything here is plain Python and NumPy, decided before (or between) the compiled programs
of `gptjax.sampling.decode` run. Lengths are bucketed so that calls with nearby lengths reuse
compiled programs; past the context window a row's context is cropped to its newest
`keep_length` tokens (see `gptjax.sampling.decode` for the whole rule).

Shape suffixes: B rows, P prompt (prefill) length, N output columns.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gptjax.errors import UserError

_MIN_PROMPT_BUCKET = 8
_MIN_NEW_BUCKET = 16
_MIN_STOP_BUCKET = 4
_ALIGN = 8  # prefill lengths past the window are rounded up to a multiple of this


def keep_length(block_size: int) -> int:
    """How many of a row's newest tokens its context keeps when the window is full."""
    return max(1, block_size // 2)


def prepare_prompts(prompts: Sequence[Sequence[int]], block_size: int, truncate: bool) -> list[list[int]]:
    """Check each prompt fits the context window; cut a longer one to its last tokens if asked."""
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise UserError("give at least one prompt (a non-empty list)")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text token)")
        if len(p) > block_size:
            if not truncate:
                raise UserError(
                    f"prompt {i} has {len(p)} tokens but the context window holds block_size={block_size}; "
                    f"shorten it, or ask to truncate the prompt (keeps its last {block_size} tokens)"
                )
            p = p[-block_size:]
        out.append(p)
    return out


def stop_ids(stop_list: Sequence[int]) -> np.ndarray:
    """The stop token ids as the programs take them: padded with -1 to a power-of-two bucket."""
    stops = np.full((_pow2_at_least(len(stop_list), _MIN_STOP_BUCKET),), -1, np.int32)
    stops[: len(stop_list)] = stop_list
    return stops


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_lengths(prompt_len: int, max_new: int, block_size: int) -> tuple[int, int, int]:
    """(prompt bucket P, cache slots S, output columns N) of a call.

    Within the window (prompt_len + max_new <= block_size) one cache of S <= block_size slots
    holds the whole call. Past it, S = block_size + 7: a prefill rounded up to a multiple of 8
    (`crop_length`) leaves its longest row at most 7 padding slots, so the loop reaches a full
    context before it runs out of slots.
    """
    n = _pow2_at_least(max_new, _MIN_NEW_BUCKET)
    if prompt_len + max_new <= block_size:
        p = min(_pow2_at_least(prompt_len, _MIN_PROMPT_BUCKET), block_size)
        if p + n > block_size:
            n = max(block_size - p, max_new)
            p = max(min(p, block_size - n), prompt_len)
        return p, p + n, n
    return crop_length(prompt_len), block_size + _ALIGN - 1, n


def crop_length(longest: int) -> int:
    """The prefill length of contexts past the window whose longest has `longest` tokens."""
    return _round_up(longest, _ALIGN)


def left_pad(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of tokens left-padded to `length`: tokens [B, P] (0 in padding) and mask [B, P]."""
    tokens_BxP = np.zeros((len(rows), length), np.int32)
    mask_BxP = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        if r:
            tokens_BxP[i, length - len(r):] = r
            mask_BxP[i, length - len(r):] = True
    return tokens_BxP, mask_BxP


def cropped_contexts(
    prompts: Sequence[Sequence[int]], new_BxN: np.ndarray, t: int, positions_B: np.ndarray, block_size: int
) -> list[list[int]]:
    """Each row's context for its next token (see `gptjax.sampling.decode`): its last
    position + 1 tokens if they fit in block_size, else its last `keep_length` tokens."""
    keep = keep_length(block_size)
    out = []
    for i, prompt in enumerate(prompts):
        seq = list(prompt) + [int(x) for x in new_BxN[i, :t]]
        n = int(positions_B[i]) + 1
        out.append(seq[-(n if n <= block_size else keep):])
    return out
