"""Token choice: the exact temperature, top-k and top-p filters, and the draw.

Token choice follows Hugging Face transformers: `TemperatureLogitsWarper`, then
`TopKLogitsWarper` (every token tied with the k-th value is kept), then `TopPLogitsWarper`
(a token is removed when the ascending cumulative probability up to it is <= 1 - top_p; the
most likely token is always kept). Temperature 0 means greedy (argmax, first index on ties).
Where transformers' result depends on the order of tied logits at the top-p cut (its
`torch.sort` is stable only for short rows), ties are broken by index as a stable ascending
sort would: the higher index counts as the more likely.

The filters never sort the vocabulary. The kept set is always of the form
`{logit > tau} | {logit == tau and index >= jcut}`, and (tau, jcut) is found either from the
top `M` candidates of `lax.top_k` (M >= top_k, exact whenever the top-p cut falls among tokens
strictly above the M-th value, which is checked per row) or, for rows where it does not, by
an exact bisection over the float order of the logits (32 passes over the vocabulary, no sort).
A token is then drawn by inverse CDF over the kept set with one uniform number per row and
step, in two levels (blocks of the vocabulary, then within the block).

Shape suffixes: B rows, V vocabulary, M candidates.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import UserError

_MIN_CANDIDATES = 64
_SAMPLE_BLOCK = 128
_NEG_INF = -jnp.inf


def check_controls(
    vocab_size: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> None:
    """Raise `UserError` for a control outside its allowed range."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_number(temperature) or not temperature >= 0 or math.isinf(temperature):
        raise UserError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab_size:
        raise UserError(f"top_k must be an integer in [0, {vocab_size}] (0 turns it off), got {top_k!r}")
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] (1.0 turns it off), got {top_p!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def num_candidates(vocab_size: int, top_k: int) -> int:
    """The static number M of `lax.top_k` candidates: a power of two >= top_k."""
    return min(vocab_size, max(_MIN_CANDIDATES, 1 << max(0, int(top_k) - 1).bit_length()))


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 values (-inf lowest; no NaNs)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _top_k_mask(x: jax.Array, top_k: jax.Array, m: int) -> jax.Array:
    """x with every value below the top_k-th set to -inf (HF TopKLogitsWarper; ties kept)."""
    vals = jax.lax.top_k(x, m)[0]
    kth = jnp.take_along_axis(vals, top_k[..., None] - 1, axis=-1)
    return jnp.where(x < kth, _NEG_INF, x)


def _top_p_cut_candidates(x: jax.Array, tail: jax.Array, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tau, jcut, exact) of the top-p cut for rows x[..., V], from the top m candidates.

    exact is False for rows whose cut is not decided by the candidates alone.
    """
    vocab = x.shape[-1]
    vals, idx = jax.lax.top_k(x, m)
    # Order the candidates as a stable ascending sort would, reversed: value desc, index desc.
    neg_vals, neg_idx = jax.lax.sort((-vals, -idx), num_keys=2)
    vals, idx = -neg_vals, -neg_idx
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    probs = jnp.exp(vals - lse)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each candidate
    limit = tail[..., None]
    keep = (1.0 - before) > limit
    keep = keep.at[..., 0].set(True)
    n = jnp.sum(keep, axis=-1)  # the kept candidates are a prefix
    tau = jnp.take_along_axis(vals, (n - 1)[..., None], axis=-1)[..., 0]
    jcut = jnp.take_along_axis(idx, (n - 1)[..., None], axis=-1)[..., 0]
    v_m = vals[..., -1]
    above = jnp.sum(jnp.where(vals > v_m[..., None], probs, 0.0), axis=-1)
    exact = ((1.0 - above) <= limit[..., 0]) | (v_m == _NEG_INF) | (m >= vocab)
    return tau, jcut, exact


def _top_p_cut_bisect(x: jax.Array, tail: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tau, jcut) of the top-p cut for rows x[..., V] by bisection on the float order.

    Finds the largest key K with mass(x <= K) <= 1 - top_p; every token at or below it is
    removed, every token above the next value up is kept, and the tokens tied at that next
    value are kept from the index where the ascending cumulative mass exceeds 1 - top_p.
    """
    keys = _order_key(x)
    probs = jax.nn.softmax(x, axis=-1)
    limit = tail[..., None]

    def mass_at_or_below(k: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(keys <= k[..., None], probs, 0.0), axis=-1)

    def step(_: int, lohi: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = lohi
        span = hi - lo
        mid = lo + (span >> 1) + (span & 1)
        ok = mass_at_or_below(mid) <= limit[..., 0]
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros(x.shape[:-1], jnp.uint32)  # below every real key: mass 0
    hi = jnp.full(x.shape[:-1], 0xFFFFFFFF, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    below = mass_at_or_below(lo)
    top_key = jnp.max(keys, axis=-1)
    next_key = jnp.min(jnp.where(keys > lo[..., None], keys, top_key[..., None]), axis=-1)
    tied = keys == next_key[..., None]
    ascending = below[..., None] + jnp.cumsum(jnp.where(tied, probs, 0.0), axis=-1)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    big = jnp.int32(x.shape[-1])
    jcut = jnp.min(jnp.where(tied & (ascending > limit), index, big), axis=-1)
    last_tied = jnp.max(jnp.where(tied, index, -1), axis=-1)
    jcut = jnp.minimum(jcut, last_tied)  # the most likely token is always kept
    tau = jnp.max(jnp.where(tied, x, _NEG_INF), axis=-1)
    return tau, jcut


def _cut(x: jax.Array, top_k: jax.Array, tail: jax.Array, *, use_k: bool, use_p: bool, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x after top-k, tau, jcut): the kept set is {x > tau} | {x == tau, index >= jcut}.

    tail is 1 - top_p, computed in float64 as transformers computes it, then rounded.
    """
    batch = x.shape[:-1]
    if use_k:
        x = _top_k_mask(x, top_k, m)
    if not use_p:
        return x, jnp.full(batch, _NEG_INF, x.dtype), jnp.zeros(batch, jnp.int32)
    tau, jcut, exact = _top_p_cut_candidates(x, tail, m)

    def exact_fallback(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        tau, jcut, exact = args
        tau_b, jcut_b = _top_p_cut_bisect(x, tail)
        return jnp.where(exact, tau, tau_b), jnp.where(exact, jcut, jcut_b)

    tau, jcut = jax.lax.cond(jnp.all(exact), lambda a: a[:2], exact_fallback, (tau, jcut, exact))
    return x, tau, jcut


def _kept(x: jax.Array, tau: jax.Array, jcut: jax.Array) -> jax.Array:
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return (x > tau[..., None]) | ((x == tau[..., None]) & (index >= jcut[..., None]))


def filter_logits(
    logits: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    *,
    candidates: int | None = None,
) -> jax.Array:
    """Logits [..., V] after temperature, top-k and top-p, with -inf where removed.

    The same computation the decoder uses; equals transformers' warpers applied in that
    order. `candidates` overrides the number of `lax.top_k` candidates (tests use a small
    number to exercise the exact fallback).
    """
    logits = jnp.asarray(logits, jnp.float32)
    check_controls(logits.shape[-1], max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        raise UserError("filter_logits needs temperature > 0 (0 means greedy: no distribution)")
    m = min(candidates or num_candidates(logits.shape[-1], top_k), logits.shape[-1])
    if top_k > m:
        raise UserError(f"candidates={m} must be >= top_k={top_k}")
    batch = logits.shape[:-1]
    x, tau, jcut = _filter_jit(
        logits,
        jnp.asarray(temperature, jnp.float32),
        jnp.full(batch, top_k, jnp.int32),
        jnp.full(batch, 1.0 - top_p, jnp.float32),
        use_k=top_k > 0,
        use_p=top_p < 1.0,
        m=m,
    )
    return jnp.where(_kept(x, tau, jcut), x, _NEG_INF)


@functools.partial(jax.jit, static_argnames=("use_k", "use_p", "m"))
def _filter_jit(logits, temperature, top_k, tail, *, use_k, use_p, m):
    return _cut(logits / temperature, top_k, tail, use_k=use_k, use_p=use_p, m=m)


def _draw(x: jax.Array, tau: jax.Array, jcut: jax.Array, u: jax.Array) -> jax.Array:
    """Token ids [B] drawn from softmax(x) restricted to the kept set, by inverse CDF with u [B]."""
    b, vocab = x.shape
    blk = _SAMPLE_BLOCK
    nb = -(-vocab // blk)
    pad = nb * blk - vocab
    mx = jnp.max(x, axis=-1, keepdims=True)
    w = jnp.where(_kept(x, tau, jcut), jnp.exp(x - mx), 0.0)
    w = jnp.pad(w, ((0, 0), (0, pad))).reshape(b, nb, blk)  # [B, blocks, block]
    block_mass = jnp.sum(w, axis=-1)
    cum = jnp.cumsum(block_mass, axis=-1)
    target = u * cum[:, -1]
    nonempty = jnp.arange(nb)[None] <= jnp.max(jnp.where(block_mass > 0, jnp.arange(nb)[None], 0), axis=-1, keepdims=True)
    block = jnp.sum((cum <= target[:, None]) & nonempty, axis=-1)
    last_block = jnp.sum(nonempty, axis=-1) - 1
    block = jnp.minimum(block, last_block)
    inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]  # [B, blk]
    offset = jnp.take_along_axis(cum - block_mass, block[:, None], axis=-1)[:, 0]
    inner_cum = offset[:, None] + jnp.cumsum(inner, axis=-1)
    j = jnp.sum(inner_cum <= target[:, None], axis=-1)
    last_pos = jnp.max(jnp.where(inner > 0, jnp.arange(blk)[None], 0), axis=-1)
    j = jnp.minimum(j, last_pos)  # never a zero-probability token, whatever the rounding
    return (block * blk + j).astype(jnp.int32)


def choose_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    tail: jax.Array,
    *,
    greedy: bool,
    use_k: bool,
    use_p: bool,
    m: int,
) -> jax.Array:
    """One token per row of logits [B, V]; row i's randomness comes only from keys[i]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b = logits.shape[0]
    x, tau, jcut = _cut(
        logits / temperature,
        jnp.broadcast_to(top_k, (b,)),
        jnp.broadcast_to(tail, (b,)),
        use_k=use_k,
        use_p=use_p,
        m=m,
    )
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    return _draw(x, tau, jcut, u)
