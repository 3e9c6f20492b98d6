"""The sampler's programs: a jitted prefill, then a jitted loop of single-token steps over a KV cache.

How a call runs (`gptjax.sampling.decoder.Decoder` drives it; `gptjax.sampling.plan` chooses
its lengths and crops its contexts):

1. Prefill: the prompts are left-padded to a bucket length and run through one forward pass
   of `GPT(cfg, decode_layout=True)` with `decode=True`, which writes the KV cache. Padding
   slots are masked out and each row's positions count from 0 at its first real token, so a
   row attends to exactly its own tokens. The prefill also chooses each row's first token.
2. Decode: a `jax.lax.while_loop` of single-token steps (the same module and parameters)
   runs until the asked number of tokens exists, every row has chosen a stop token, or a
   row's context is full. The loop state (`DecodeState`) is donated, so XLA updates the cache
   in place. Lengths are bucketed, so calls with nearby lengths reuse compiled code.
3. Past the context window. The model has `block_size` positions (learned, or rotary ones
   it was trained on), so a token is predicted from at most `block_size` tokens. The context of a row's next token is the row's
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

The Flax model is imported only when a program is traced (in `prefill`, `advance` and
`lower_decode_layout`), so a process that finds every program stored (`programs`) never
imports Flax. `lower_prefill` and `lower_decode` lower the first call's programs from
abstract inputs, for the ahead-of-time compile (`gptjax.aot`).

Randomness: row i of a call with `seed=s` uses the key `jax.random.fold_in(PRNGKey(s), i)`,
and its t-th new token uses `fold_in(row_key, t)`. The choice for a row depends only on that
row's logits and key, so a prompt gives the same tokens in a batch as alone with the same row
key (pass `row_keys` to `generate_tokens` to choose them).

Shape suffixes: B rows, P prompt (prefill) length, S cache slots, N output columns, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.model.config import GPTConfig
from gptjax.sampling.filters import choose_tokens, num_candidates
from gptjax.sampling.plan import plan_lengths, stop_ids


@dataclasses.dataclass(frozen=True)
class Static:
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

    cache: Any  # the model's `cache` collection: per layer keys/values [B * kv heads, S, D], valid [B, S], index
    token_B: jax.Array  # each row's newest token, not yet in the cache
    position_B: jax.Array  # its position: the number of the row's tokens in the cache
    done_B: jax.Array  # the row has chosen a stop token
    out_BxN: jax.Array  # the new tokens, columns [0, t)
    t: jax.Array  # how many new tokens exist


def _choose(s: Static, logits_BxV: jax.Array, row_keys: jax.Array, t: jax.Array, temperature: jax.Array,
            top_k: jax.Array, tail: jax.Array) -> jax.Array:
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
    return choose_tokens(
        logits_BxV, step_keys, temperature, top_k, tail, greedy=s.greedy, use_k=s.use_k, use_p=s.use_p, m=s.m
    )


@functools.partial(jax.jit, static_argnames=("s",), donate_argnames=("out_BxN",))
def prefill(params: Any, tokens_BxP: jax.Array, mask_BxP: jax.Array, out_BxN: jax.Array, t: jax.Array, done_B: jax.Array,
            row_keys: jax.Array, temperature: jax.Array, top_k: jax.Array, tail: jax.Array, stops: jax.Array, *,
            s: Static) -> DecodeState:
    """Prefill left-padded contexts into a fresh cache and choose each row's new token t.

    The controls (row_keys ... stops) are the `Decoder`'s: row keys, temperature, top_k,
    1 - top_p and the stop ids (`gptjax.sampling.plan.stop_ids`).
    """
    import flax.linen as nn

    from gptjax.model.gpt import GPT
    from gptjax.model.layers import head_logits, head_table

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
    # The head on the last position only (the model's head, as `GPT` applies it).
    logits_BxV = head_logits(s.cfg, hidden_BxPxC[:, -1:], head_table(s.cfg, params))[:, 0]
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
def advance(params: Any, state: DecodeState, limit: jax.Array, row_keys: jax.Array, temperature: jax.Array,
            top_k: jax.Array, tail: jax.Array, stops: jax.Array, *, s: Static) -> DecodeState:
    """Decode until `limit` new tokens exist, every row has stopped, or a row's context is full."""
    from gptjax.model.gpt import GPT

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


def lower_decode_layout(cfg: GPTConfig, params: Any) -> jax.stages.Lowered:
    """The conversion of `params` to the decode layout the programs read, lowered."""
    from gptjax.model.decode_layout import to_decode_layout

    return to_decode_layout.lower(cfg, params)


@functools.partial(jax.jit, static_argnames=("n",))
def make_row_keys(seed: jax.Array, n: int) -> jax.Array:
    """Row i's key: fold_in(PRNGKey(seed), i)."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


# -- ahead of time -------------------------------------------------------------------------------


def _abstract_call(
    cfg: GPTConfig, rows: int, prompt_len: int, max_new_tokens: int, placement: jax.sharding.Sharding
) -> tuple[Static, int, int, tuple[jax.ShapeDtypeStruct, ...]]:
    """A first call's static choices, prompt bucket P, output columns N and its controls as
    ShapeDtypeStructs: `rows` prompts of `prompt_len` tokens, sampled (temperature 1, no
    top-k or top-p: the sample CLI's defaults)."""
    p_len, cache_len, n_len = plan_lengths(prompt_len, max_new_tokens, cfg.block_size)
    s = Static(cfg=cfg, cache_len=cache_len, greedy=False, use_k=False, use_p=False, m=num_candidates(cfg.vocab_size, 0))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placement)
    controls = (sds((rows, 2), jnp.uint32), sds((), jnp.float32), sds((), jnp.int32), sds((), jnp.float32), sds(stop_ids(()).shape, jnp.int32))
    return s, p_len, n_len, controls


def lower_prefill(
    cfg: GPTConfig, decode_params: Any, rows: int, prompt_len: int, max_new_tokens: int, placement: jax.sharding.Sharding
) -> jax.stages.Lowered:
    """A call's first prefill, lowered from abstract inputs: `decode_params` are the decode-layout
    parameters as ShapeDtypeStructs with their shardings; prompts and controls take `placement`."""
    s, p_len, n_len, controls = _abstract_call(cfg, rows, prompt_len, max_new_tokens, placement)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placement)
    return prefill.lower(
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
    return advance.lower(decode_params, state, jax.ShapeDtypeStruct((), jnp.int32, sharding=placement), *controls, s=s)
