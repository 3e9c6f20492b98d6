"""`Decoder`: one sampling call from prompts to new tokens, driving the compiled programs.

A call is checked and planned on the host (`gptjax.sampling.plan`), then runs the programs of
`gptjax.sampling.decode` through the program cache (`gptjax.sampling.programs`): a prefill, the
decode loop, and, each time a row's context fills the window, a prefill of the cropped
contexts before the loop goes on. `stream` yields the new tokens as they come.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import UserError
from gptjax.model.config import GPTConfig
from gptjax.sampling import decode, programs
from gptjax.sampling.filters import check_controls, num_candidates
from gptjax.sampling.plan import crop_length, cropped_contexts, left_pad, plan_lengths, prepare_prompts, stop_ids


@dataclasses.dataclass
class Generation:
    """The result of one call: new tokens per row (stop token excluded) and timings."""

    tokens: list[list[int]]
    stopped: list[bool]
    prompt_lengths: list[int]
    seconds_to_first_token: float
    seconds: float
    finished: bool = True

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's checked inputs."""

    prompts: list[list[int]]
    stop_list: list[int]
    max_new_tokens: int
    chunk: int | None
    p_len: int
    n_len: int
    s: decode.Static
    controls: tuple[Any, ...]  # row_keys, temperature, top_k, 1 - top_p, stop ids: the programs' inputs


class Decoder:
    """A GPT's config and parameters, with the compiled prefill and decode programs."""

    def __init__(self, cfg: GPTConfig, params: Any):
        self.cfg = cfg
        self.params = params
        self._decode_params: Any = None

    @property
    def decode_params(self) -> Any:
        """The parameters in decode layout (`gptjax.model.decode_layout.to_decode_layout`), made on first use."""
        if self._decode_params is None:
            cfg, params = self.cfg, self.params
            self._decode_params = programs.call("decode_layout", lambda: decode.lower_decode_layout(cfg, params), cfg, (params,))
        return self._decode_params

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_tokens: Sequence[int] = (),
        seed: int = 0,
        row_keys: jax.Array | None = None,
        truncate_prompt: bool = False,
        chunk: int | None = None,
    ) -> Iterator[tuple[list[list[int]], Generation]]:
        """Yield (new tokens per row since the last yield, result so far) every `chunk` steps.

        `chunk=None` decodes everything in one call. The last yield's result is final. Bad
        controls or prompts raise here, before the first token is asked for.
        """
        return self._run(
            self._plan(
                prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                stop_tokens=stop_tokens, seed=seed, row_keys=row_keys, truncate_prompt=truncate_prompt, chunk=chunk,
            )
        )

    def _plan(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
        stop_tokens: Sequence[int], seed: int, row_keys: jax.Array | None, truncate_prompt: bool, chunk: int | None,
    ) -> _Call:
        """Check a call's input and choose its lengths and compiled programs."""
        cfg = self.cfg
        check_controls(cfg.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        prompts = prepare_prompts(prompts, cfg.block_size, truncate_prompt)
        stop_list = sorted({int(t) for t in stop_tokens})
        for t in stop_list:
            if not 0 <= t < cfg.vocab_size:
                raise UserError(f"stop token {t} is outside the vocabulary [0, {cfg.vocab_size})")
        b = len(prompts)
        if row_keys is None:
            seed_arg = (np.uint32(seed),)
            row_keys = programs.call("row_keys", lambda: decode.make_row_keys.lower(*seed_arg, b), b, seed_arg)
        row_keys = jnp.asarray(row_keys)
        if row_keys.shape[0] != b:
            raise UserError(f"row_keys has {row_keys.shape[0]} keys for {b} prompts")
        p_len, cache_len, n_len = plan_lengths(max(len(p) for p in prompts), max_new_tokens, cfg.block_size)
        greedy = temperature == 0
        s = decode.Static(
            cfg=cfg,
            cache_len=cache_len,
            greedy=greedy,
            use_k=not greedy and top_k > 0,
            use_p=not greedy and top_p < 1.0,
            m=num_candidates(cfg.vocab_size, top_k),
        )
        controls = (
            row_keys,
            np.float32(temperature if temperature > 0 else 1.0),
            np.int32(max(top_k, 1)),
            np.float32(1.0 - top_p),
            stop_ids(stop_list),
        )
        return _Call(prompts, stop_list, max_new_tokens, chunk, p_len, n_len, s, controls)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], **controls: Any) -> Generation:
        """New tokens for each prompt (a list of token ids); see `stream` for the controls."""
        result = None
        for _, result in self.stream(prompts, **controls):
            pass
        assert result is not None
        return result

    def _prefill(self, call: _Call, rows: list[list[int]], length: int, out_BxN: Any, t: int, done_B: Any) -> decode.DecodeState:
        tokens_BxP, mask_BxP = left_pad(rows, length)
        args = (self.decode_params, tokens_BxP, mask_BxP, out_BxN, np.int32(t), done_B, *call.controls)
        return programs.call("prefill", lambda: decode.prefill.lower(*args, s=call.s), call.s, args)

    def _run_to(self, call: _Call, state: decode.DecodeState, limit: int) -> decode.DecodeState:
        """Decode, cropping full contexts, until `limit` new tokens exist or every row stopped."""
        block_size = self.cfg.block_size
        while True:
            t, done_B, position_B = jax.device_get((state.t, state.done_B, state.position_B))
            if t >= limit or done_B.all():
                return state
            if (position_B >= block_size).any():
                rows = cropped_contexts(call.prompts, np.asarray(state.out_BxN), int(t), position_B, block_size)
                length = crop_length(max(len(r) for r in rows))
                state = self._prefill(call, rows, length, state.out_BxN, int(t), state.done_B)
            else:
                args = (self.decode_params, state, np.int32(limit), *call.controls)
                state = programs.call("advance", lambda: decode.advance.lower(*args, s=call.s), call.s, args)

    def _run(self, call: _Call) -> Iterator[tuple[list[list[int]], Generation]]:
        b = len(call.prompts)
        t0 = time.perf_counter()
        state = self._prefill(call, call.prompts, call.p_len, np.zeros((b, call.n_len), np.int32), 0, np.zeros((b,), bool))
        state = jax.block_until_ready(state)
        ttft = time.perf_counter() - t0
        emitted: list[list[int]] = [[] for _ in range(b)]
        stopped = [False] * b
        sent = 0
        while True:
            t_now = int(state.t)
            finished = t_now >= call.max_new_tokens or bool(np.all(np.asarray(state.done_B)))
            if call.chunk is not None or finished:
                out_BxN = np.asarray(state.out_BxN)
                new_rows = []
                for i in range(b):
                    row = []
                    for tok in out_BxN[i, sent:t_now] if not stopped[i] else ():
                        if int(tok) in call.stop_list:
                            stopped[i] = True
                            break
                        row.append(int(tok))
                    emitted[i].extend(row)
                    new_rows.append(row)
                sent = t_now
                elapsed = time.perf_counter() - t0
                lengths = [len(p) for p in call.prompts]
                yield new_rows, Generation([list(r) for r in emitted], list(stopped), lengths, ttft, elapsed, finished)
            if finished:
                return
            limit = min(call.max_new_tokens, t_now + call.chunk) if call.chunk else call.max_new_tokens
            state = self._run_to(call, state, limit)


def generate_tokens(cfg: GPTConfig, params: Any, prompts: Sequence[Sequence[int]], **controls: Any) -> list[list[int]]:
    """New token ids per prompt; a functional shortcut for `Decoder(cfg, params).generate_tokens`."""
    return Decoder(cfg, params).generate_tokens(prompts, **controls).tokens
