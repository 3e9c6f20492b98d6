"""The decoder: a jitted prefill, then a jitted loop of single-token steps over a KV cache.

How a call runs:

1. Prefill: the prompts are left-padded to a bucket length and run through one forward pass
   of `GPT(cfg, decode_layout=True)` with `decode=True`, which writes the KV cache. Padding
   slots are masked out and each row's positions count from 0 at its first real token, so a
   row attends to exactly its own tokens. The prefill also chooses each row's first token.
2. Decode: a `jax.lax.while_loop` of single-token steps (the same module and parameters)
   runs until the asked number of tokens exists, every row has chosen a stop token, or a
   row's context is full. The loop state (`DecodeState`) is donated, so XLA updates the cache
   in place. Lengths are bucketed, so calls with nearby lengths reuse compiled code.
3. Past the context window. The model has `block_size` learned positions, so a token is
   predicted from at most `block_size` tokens. The context of a row's next token is the row's
   most recent tokens: all of them while they fit; when one more would not fit, it restarts
   from the newest `keep = max(1, block_size // 2)` tokens (at positions 0..keep-1) and grows
   again. Context lengths thus run L, L+1, ..., block_size, keep, keep+1, ..., block_size,
   keep, ... for a prompt of L tokens. When a row reaches that point the loop returns, and
   every row's context, by that rule, is prefilled again into a fresh cache (a row that has
   not reached it keeps its whole context, so a row's tokens never depend on the batch); then
   the loop continues. So `max_new_tokens` is unbounded. A prompt must fit the window
   (at most `block_size` tokens); a longer one is refused, or with `truncate_prompt` cut to
   its last `block_size` tokens.

The prefill after a crop runs between two runs of the loop (one host round trip every
`block_size - keep` tokens) because its length depends on where the rows' contexts stand; it
is prefilled at that length (rounded up to a multiple of 8), not padded to a fixed one.

The Flax model is imported only when a program is traced (in `_prefill`, `_advance` and the
decode-layout conversion), so a process that finds every program stored (`programs`) never
imports Flax.

Randomness: row i of a call with `seed=s` uses the key `jax.random.fold_in(PRNGKey(s), i)`,
and its t-th new token uses `fold_in(row_key, t)`. The choice for a row depends only on that
row's logits and key, so a prompt gives the same tokens in a batch as alone with the same row
key (pass `row_keys` to `generate_tokens` to choose them).

Shape suffixes: B rows, P prompt (prefill) length, S cache slots, N output columns, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import UserError
from gptjax.model.config import GPTConfig
from gptjax.sampling import programs
from gptjax.sampling.filters import check_controls, choose_tokens, num_candidates

_MIN_PROMPT_BUCKET = 8
_MIN_NEW_BUCKET = 16
_ALIGN = 8  # prefill lengths past the window are rounded up to a multiple of this


def keep_length(block_size: int) -> int:
    """How many of a row's newest tokens its context keeps when the window is full."""
    return max(1, block_size // 2)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that selects a compiled program (besides array shapes)."""

    cfg: GPTConfig
    cache_len: int
    greedy: bool
    use_k: bool
    use_p: bool
    m: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's state (a pytree, donated to each loop run)."""

    cache: Any  # the model's `cache` collection: per layer keys/values [B * H, S, D], valid [B, S], index
    token_B: jax.Array  # each row's newest token, not yet in the cache
    position_B: jax.Array  # its position: the number of the row's tokens in the cache
    done_B: jax.Array  # the row has chosen a stop token
    out_BxN: jax.Array  # the new tokens, columns [0, t)
    t: jax.Array  # how many new tokens exist


def _choose(s: _Static, logits_BxV, row_keys, t, temperature, top_k, tail) -> jax.Array:
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
    return choose_tokens(
        logits_BxV, step_keys, temperature, top_k, tail, greedy=s.greedy, use_k=s.use_k, use_p=s.use_p, m=s.m
    )


@functools.partial(jax.jit, static_argnames=("s",), donate_argnames=("out_BxN",))
def _prefill(params, tokens_BxP, mask_BxP, out_BxN, t, done_B, row_keys, temperature, top_k, tail, stops, *, s: _Static):
    """Prefill left-padded contexts into a fresh cache and choose each row's new token t."""
    import flax.linen as nn

    from gptjax.model import GPT, matmul

    b, p = tokens_BxP.shape
    model = GPT(s.cfg, decode_layout=True)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((b, s.cache_len), jnp.int32), decode=True)["cache"]
    )
    cache = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), nn.meta.unbox(shapes))
    lengths_B = jnp.sum(mask_BxP, axis=-1).astype(jnp.int32)
    positions_BxP = jnp.maximum(jnp.arange(p, dtype=jnp.int32)[None] - (p - lengths_B)[:, None], 0)
    hidden_BxPxC, variables = model.apply(
        {"params": params, "cache": cache}, tokens_BxP, positions_BxP, mask_BxP,
        decode=True, return_hidden=True, mutable=["cache"],
    )
    # The tied head on the last position only (the model's head, as `GPT` applies it).
    wte_VxC = params["wte"]["embedding"].astype(hidden_BxPxC.dtype)
    logits_BxV = matmul("bc,vc->bv", hidden_BxPxC[:, -1], wte_VxC)
    new_B = _choose(s, logits_BxV, row_keys, t, temperature, top_k, tail)
    new_B = jnp.where(done_B, 0, new_B)
    return DecodeState(
        cache=variables["cache"],
        token_B=new_B,
        position_B=lengths_B,
        done_B=done_B | jnp.any(new_B[:, None] == stops[None], axis=-1),
        out_BxN=jax.lax.dynamic_update_slice(out_BxN, new_B[:, None], (0, t)),
        t=t + 1,
    )


@functools.partial(jax.jit, static_argnames=("s",), donate_argnames=("state",))
def _advance(params, state: DecodeState, limit, row_keys, temperature, top_k, tail, stops, *, s: _Static) -> DecodeState:
    """Decode until `limit` new tokens exist, every row has stopped, or a row's context is full."""
    from gptjax.model import GPT

    model = GPT(s.cfg, decode_layout=True)

    def cond(st: DecodeState) -> jax.Array:
        return (st.t < limit) & ~jnp.all(st.done_B) & jnp.all(st.position_B < s.cfg.block_size)

    def body(st: DecodeState) -> DecodeState:
        logits_Bx1xV, variables = model.apply(
            {"params": params, "cache": st.cache},
            st.token_B[:, None],
            st.position_B[:, None],
            None,
            decode=True,
            mutable=["cache"],
        )
        new_B = _choose(s, logits_Bx1xV[:, 0], row_keys, st.t, temperature, top_k, tail)
        new_B = jnp.where(st.done_B, 0, new_B)
        return DecodeState(
            cache=variables["cache"],
            token_B=new_B,
            position_B=st.position_B + 1,
            done_B=st.done_B | jnp.any(new_B[:, None] == stops[None], axis=-1),
            out_BxN=jax.lax.dynamic_update_slice(st.out_BxN, new_B[:, None], (0, st.t)),
            t=st.t + 1,
        )

    return jax.lax.while_loop(cond, body, state)


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


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_lengths(prompt_len: int, max_new: int, block_size: int) -> tuple[int, int, int]:
    """(prompt bucket P, cache slots S, output columns N) of a call.

    Within the window (prompt_len + max_new <= block_size) one cache of S <= block_size slots
    holds the whole call. Past it, S = block_size + 7: a prefill rounded up to a multiple of 8
    leaves its longest row at most 7 padding slots, so the loop reaches a full context before
    it runs out of slots.
    """
    n = _pow2_at_least(max_new, _MIN_NEW_BUCKET)
    if prompt_len + max_new <= block_size:
        p = min(_pow2_at_least(prompt_len, _MIN_PROMPT_BUCKET), block_size)
        if p + n > block_size:
            n = max(block_size - p, max_new)
            p = max(min(p, block_size - n), prompt_len)
        return p, p + n, n
    return _round_up(prompt_len, _ALIGN), block_size + _ALIGN - 1, n


def _left_pad(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
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
    """Each row's context for its next token (see the module docstring): its last
    position + 1 tokens if they fit in block_size, else its last `keep_length` tokens."""
    keep = keep_length(block_size)
    out = []
    for i, prompt in enumerate(prompts):
        seq = list(prompt) + [int(x) for x in new_BxN[i, :t]]
        n = int(positions_B[i]) + 1
        out.append(seq[-(n if n <= block_size else keep):])
    return out


def _lower_decode_layout(cfg: GPTConfig, params: Any) -> jax.stages.Lowered:
    from gptjax.model import to_decode_layout

    return to_decode_layout.lower(cfg, params)


@functools.partial(jax.jit, static_argnames=("n",))
def _row_keys(seed: jax.Array, n: int) -> jax.Array:
    """Row i's key: fold_in(PRNGKey(seed), i)."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call's checked inputs."""

    prompts: list[list[int]]
    stop_list: list[int]
    max_new_tokens: int
    chunk: int | None
    p_len: int
    n_len: int
    s: _Static
    controls: tuple[Any, ...]  # row_keys, temperature, top_k, 1 - top_p, stop ids: the programs' inputs


class Decoder:
    """A GPT's config and parameters, with the compiled prefill and decode programs."""

    def __init__(self, cfg: GPTConfig, params: Any):
        self.cfg = cfg
        self.params = params
        self._decode_params: Any = None

    @property
    def decode_params(self) -> Any:
        """The parameters in decode layout (`gptjax.model.to_decode_layout`), made on first use."""
        if self._decode_params is None:
            cfg, params = self.cfg, self.params
            self._decode_params = programs.call("decode_layout", lambda: _lower_decode_layout(cfg, params), cfg, (params,))
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
            row_keys = programs.call("row_keys", lambda: _row_keys.lower(*seed_arg, b), b, seed_arg)
        row_keys = jnp.asarray(row_keys)
        if row_keys.shape[0] != b:
            raise UserError(f"row_keys has {row_keys.shape[0]} keys for {b} prompts")
        stops = np.full((_pow2_at_least(len(stop_list), 4),), -1, np.int32)
        stops[: len(stop_list)] = stop_list
        p_len, cache_len, n_len = plan_lengths(max(len(p) for p in prompts), max_new_tokens, cfg.block_size)
        greedy = temperature == 0
        s = _Static(
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
            stops,
        )
        return _Call(prompts, stop_list, max_new_tokens, chunk, p_len, n_len, s, controls)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], **controls: Any) -> Generation:
        """New tokens for each prompt (a list of token ids); see `stream` for the controls."""
        result = None
        for _, result in self.stream(prompts, **controls):
            pass
        assert result is not None
        return result

    def _prefill(self, call: _Call, rows: list[list[int]], length: int, out_BxN: Any, t: int, done_B: Any) -> DecodeState:
        tokens_BxP, mask_BxP = _left_pad(rows, length)
        args = (self.decode_params, tokens_BxP, mask_BxP, out_BxN, np.int32(t), done_B, *call.controls)
        return programs.call("prefill", lambda: _prefill.lower(*args, s=call.s), call.s, args)

    def _run_to(self, call: _Call, state: DecodeState, limit: int) -> DecodeState:
        """Decode, cropping full contexts, until `limit` new tokens exist or every row stopped."""
        block_size = self.cfg.block_size
        while True:
            t, done_B, position_B = jax.device_get((state.t, state.done_B, state.position_B))
            if t >= limit or done_B.all():
                return state
            if (position_B >= block_size).any():
                rows = cropped_contexts(call.prompts, np.asarray(state.out_BxN), int(t), position_B, block_size)
                length = _round_up(max(len(r) for r in rows), _ALIGN)
                state = self._prefill(call, rows, length, state.out_BxN, int(t), state.done_B)
            else:
                args = (self.decode_params, state, np.int32(limit), *call.controls)
                state = programs.call("advance", lambda: _advance.lower(*args, s=call.s), call.s, args)

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


# -- ahead of time -------------------------------------------------------------------------------


def _abstract_call(
    cfg: GPTConfig, rows: int, prompt_len: int, max_new_tokens: int, placement: jax.sharding.Sharding
) -> tuple[_Static, int, int, tuple[jax.ShapeDtypeStruct, ...]]:
    """A first call's static choices, prompt bucket P, output columns N and its controls as
    ShapeDtypeStructs: `rows` prompts of `prompt_len` tokens, sampled (temperature 1, no
    top-k or top-p: the sample CLI's defaults)."""
    p_len, cache_len, n_len = plan_lengths(prompt_len, max_new_tokens, cfg.block_size)
    s = _Static(cfg=cfg, cache_len=cache_len, greedy=False, use_k=False, use_p=False, m=num_candidates(cfg.vocab_size, 0))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placement)
    controls = (sds((rows, 2), jnp.uint32), sds((), jnp.float32), sds((), jnp.int32), sds((), jnp.float32), sds((4,), jnp.int32))
    return s, p_len, n_len, controls


def lower_prefill(
    cfg: GPTConfig, decode_params: Any, rows: int, prompt_len: int, max_new_tokens: int, placement: jax.sharding.Sharding
) -> jax.stages.Lowered:
    """A call's first prefill, lowered from abstract inputs: `decode_params` are the decode-layout
    parameters as ShapeDtypeStructs with their shardings; prompts and controls take `placement`."""
    s, p_len, n_len, controls = _abstract_call(cfg, rows, prompt_len, max_new_tokens, placement)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placement)
    return _prefill.lower(
        decode_params, sds((rows, p_len), jnp.int32), sds((rows, p_len), jnp.bool_), sds((rows, n_len), jnp.int32),
        sds((), jnp.int32), sds((rows,), jnp.bool_), *controls, s=s,
    )


def lower_decode(
    cfg: GPTConfig, decode_params: Any, state: DecodeState, rows: int, prompt_len: int, max_new_tokens: int,
    placement: jax.sharding.Sharding,
) -> jax.stages.Lowered:
    """The decode loop that follows `lower_prefill`'s prefill, lowered from abstract inputs;
    `state` is that prefill's output (ShapeDtypeStructs with shardings). The compiler's cost
    analysis counts the loop body, one decode step, once."""
    s, _, _, controls = _abstract_call(cfg, rows, prompt_len, max_new_tokens, placement)
    return _advance.lower(decode_params, state, jax.ShapeDtypeStruct((), jnp.int32, sharding=placement), *controls, s=s)
