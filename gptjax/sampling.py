"""Text generation: prefill the prompts in one pass, then decode inside `jax.jit`.

How a call runs:

1. The prompts are left-padded to a bucket length (a power of two) and prefilled in one
   forward pass of `gptjax.model.GPT` with `decode=True`, which writes the KV cache. Padding
   slots are masked out and each row's positions count from 0 at its first real token, so a
   row attends to exactly its own tokens.
2. New tokens come from a `jax.lax.while_loop` over single-token decode steps (the same
   module and parameters as training), which stops early once every row has hit a stop token.
   The cache is carried in the loop and the loop state is donated, so XLA updates the cache in
   place. The cache length is also bucketed, so calls with nearby lengths reuse compiled code.

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

Randomness: row i of a call with `seed=s` uses the key `jax.random.fold_in(PRNGKey(s), i)`,
and its t-th new token uses `fold_in(row_key, t)`. The choice for a row depends only on that
row's logits and key, so a prompt gives the same tokens in a batch as alone with the same row
key (pass `row_keys` to `generate_tokens` to choose them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.errors import UserError
from gptjax.model import GPT, GPTConfig, QKVProjection

_MIN_PROMPT_BUCKET = 8
_MIN_NEW_BUCKET = 16
_MIN_CANDIDATES = 64
_SAMPLE_BLOCK = 128
_NEG_INF = -jnp.inf


# --------------------------------------------------------------------------- controls


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


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


def _candidates(vocab_size: int, top_k: int) -> int:
    """The static number M of `lax.top_k` candidates: a power of two >= top_k."""
    return min(vocab_size, _pow2_at_least(top_k, _MIN_CANDIDATES))


# --------------------------------------------------------------------------- filters


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
    m = min(candidates or _candidates(logits.shape[-1], top_k), logits.shape[-1])
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
    w = jnp.pad(w, ((0, 0), (0, pad))).reshape(b, nb, blk)
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


# --------------------------------------------------------------------------- decoder


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that selects a compiled program (besides array shapes)."""

    cfg: GPTConfig
    cache_len: int
    greedy: bool
    use_k: bool
    use_p: bool
    m: int


def _step_keys(row_keys: jax.Array, t: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)


def _controls_choose(s: _Static, logits, row_keys, t, temperature, top_k, tail):
    return choose_tokens(
        logits, _step_keys(row_keys, t), temperature, top_k, tail,
        greedy=s.greedy, use_k=s.use_k, use_p=s.use_p, m=s.m,
    )


@functools.partial(jax.jit, static_argnames=("s", "n_out"))
def _start(params, kernels, tokens, mask, row_keys, temperature, top_k, tail, stops, *, s: _Static, n_out: int):
    """Prefill left-padded prompts [B, P] and choose each row's first new token."""
    b, p = tokens.shape
    model = GPT(s.cfg)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((b, s.cache_len), jnp.int32), decode=True)["cache"]
    )
    cache = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), nn.meta.unbox(shapes))
    lengths = jnp.sum(mask, axis=-1).astype(jnp.int32)
    positions = jnp.maximum(jnp.arange(p, dtype=jnp.int32)[None] - (p - lengths)[:, None], 0)
    with nn.intercept_methods(_decode_matmuls(kernels)):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, positions, mask, decode=True, mutable=["cache"]
        )
    first = _controls_choose(s, logits[:, -1], row_keys, jnp.int32(0), temperature, top_k, tail)
    out = jnp.zeros((b, n_out), jnp.int32).at[:, 0].set(first)
    # Loop state: cache, last token, next position, done flags, output buffer, step count.
    return dict(
        cache=variables["cache"],
        token=first,
        position=lengths,
        done=jnp.any(first[:, None] == stops[None], axis=-1),
        out=out,
        t=jnp.int32(1),
    )


def decode_layout(params: Any) -> dict[str, Any]:
    """Every dense kernel as a [out, in] matrix: the layout XLA's CPU matmuls read fastest.

    Flax stores kernels [in, out]; with few rows per step (decoding) XLA on the CPU multiplies
    by [out, in] matrices up to twice as fast at batch 8-32, and given the flax layout inside a
    loop it even re-transposes the tied [vocab, embed] table every step. The decoder therefore
    keeps this copy (made once per `Decoder`) and `_decode_matmuls` uses it in place of the
    kernels: same parameters and arithmetic, another memory layout.
    """
    out: dict[str, Any] = {}

    def visit(tree: Any, path: tuple[str, ...]) -> None:
        for name, sub in tree.items():
            if isinstance(sub, dict):
                visit(sub, path + (name,))
            elif name == "kernel":
                n_in = 2 if path[-2:] == ("attn", "c_proj") else 1  # [heads, head_dim, embed]
                k = jnp.asarray(sub)
                out["/".join(path)] = _to_out_in(k, n_in)

    visit(params, ())
    return out


@functools.partial(jax.jit, static_argnums=1)
def _to_out_in(kernel: jax.Array, n_in: int) -> jax.Array:
    n = math.prod(kernel.shape[:n_in])
    return kernel.reshape(n, -1).T


def _decode_matmuls(kernels: dict[str, Any]) -> Callable[..., Any]:
    """A flax method interceptor: the model's linear layers and tied output head read `kernels`.

    Any module called with one input whose `kernel` parameter is in `kernels` (by path) is
    computed as x[..., in] @ kernel[out, in]^T + bias, which is what a linear layer with the
    kernel's leading `in` axes contracted computes (the query/key/value projection then
    returns q, k, v as [batch, heads, seq, head_dim]; the attention's output projection
    contracts heads and head_dim of its [batch, heads, seq, head_dim] input). A module whose
    shapes do not fit that is left alone. (The model's output head already multiplies by the
    [vocab, embed] table as stored, the [out, in] layout.)
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        key = "/".join(module.path)
        if context.method_name != "__call__" or key not in kernels or len(args) != 1 or kwargs:
            return next_fun(*args, **kwargs)
        x, w = args[0], kernels[key]  # w: [out, in]
        own = module.variables.get("params", {})
        kernel, bias = own.get("kernel"), own.get("bias")
        n_in = 2 if key.endswith("attn/c_proj") else 1
        if kernel is None or math.prod(kernel.shape[:n_in]) != w.shape[1]:
            return next_fun(*args, **kwargs)
        # As in the model: operands in the compute dtype, fp32 accumulation and bias.
        dtype = getattr(module, "dtype", None) or getattr(getattr(module, "cfg", None), "compute_dtype", jnp.float32)
        x, w = x.astype(dtype), w.astype(dtype)

        def linear(x: jax.Array) -> jax.Array:  # x[..., in] @ w[out, in]^T + bias
            y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return y if bias is None else y + bias.reshape(-1)

        if isinstance(module, QKVProjection):  # x [b, t, c] -> q, k, v [b, h, t, d]
            if x.shape[-1] != kernel.shape[0]:
                return next_fun(*args, **kwargs)
            y = linear(x).astype(dtype).reshape(*x.shape[:2], *kernel.shape[1:])
            return tuple(jnp.swapaxes(y[:, :, j], 1, 2) for j in range(kernel.shape[1]))
        if n_in == 2:  # the attention's output projection: x [b, h, t, d] -> [b, t, c]
            h, d = kernel.shape[:2]
            if x.ndim != 4 or (x.shape[1], x.shape[3]) != (h, d):
                return next_fun(*args, **kwargs)
            # Move the (small) activations, never the weights: [b, t, h * d] @ w[c, h * d]^T.
            return linear(jnp.swapaxes(x, 1, 2).reshape(x.shape[0], x.shape[2], h * d))
        if x.shape[-1] != kernel.shape[0]:
            return next_fun(*args, **kwargs)
        return linear(x).reshape(*x.shape[:-1], *kernel.shape[1:])

    return interceptor


@functools.partial(jax.jit, static_argnames=("s",), donate_argnames=("state",))
def _advance(params, kernels, state, limit, row_keys, temperature, top_k, tail, stops, *, s: _Static):
    """Decode until `limit` new tokens exist or every row has stopped."""
    model = GPT(s.cfg)

    def cond(st):
        return (st["t"] < limit) & ~jnp.all(st["done"])

    def body(st):
        with nn.intercept_methods(_decode_matmuls(kernels)):
            logits, variables = model.apply(
                {"params": params, "cache": st["cache"]},
                st["token"][:, None],
                st["position"][:, None],
                None,
                decode=True,
                mutable=["cache"],
            )
        new = _controls_choose(s, logits[:, 0], row_keys, st["t"], temperature, top_k, tail)
        new = jnp.where(st["done"], 0, new)
        out = jax.lax.dynamic_update_slice(st["out"], new[:, None], (0, st["t"]))
        done = st["done"] | jnp.any(new[:, None] == stops[None], axis=-1)
        return dict(cache=variables["cache"], token=new, position=st["position"] + 1, done=done, out=out, t=st["t"] + 1)

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


def prepare_prompts(prompts: Sequence[Sequence[int]], block_size: int, max_new_tokens: int, truncate: bool) -> list[list[int]]:
    """Check the prompts fit the context with max_new_tokens; cut from the left if asked."""
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise UserError("give at least one prompt (a non-empty list)")
    if max_new_tokens >= block_size:
        raise UserError(f"max_new_tokens={max_new_tokens} must be < the context length block_size={block_size}")
    room = block_size - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise UserError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text token)")
        if len(p) > room:
            if not truncate:
                raise UserError(
                    f"prompt {i} has {len(p)} tokens but block_size={block_size} leaves room for {room} with "
                    f"max_new_tokens={max_new_tokens}; shorten it, lower max_new_tokens, or ask to truncate the prompt"
                )
            p = p[-room:]
        out.append(p)
    return out


def _lengths(prompt_len: int, max_new: int, block_size: int) -> tuple[int, int]:
    """(prompt bucket P, output bucket N) with P >= prompt_len, N >= max_new, P + N <= block_size."""
    p = min(_pow2_at_least(prompt_len, _MIN_PROMPT_BUCKET), block_size)
    n = _pow2_at_least(max_new, _MIN_NEW_BUCKET)
    if p + n > block_size:
        n = max(block_size - p, max_new)
        p = max(min(p, block_size - n), prompt_len)
    return p, n


@functools.partial(jax.jit, static_argnames=("n",))
def _row_keys(seed: jax.Array, n: int) -> jax.Array:
    """Row i's key: fold_in(PRNGKey(seed), i)."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


class Decoder:
    """A GPT's config and parameters, with the compiled prefill and decode programs."""

    def __init__(self, cfg: GPTConfig, params: Any):
        self.cfg = cfg
        self.params = params
        self._kernels: dict[str, Any] | None = None

    @property
    def kernels(self) -> dict[str, Any]:
        """The dense kernels in decode layout, made on first use (see `decode_layout`)."""
        if self._kernels is None:
            self._kernels = decode_layout(self.params)
        return self._kernels

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

        `chunk=None` decodes everything in one call. The last yield's result is final.
        """
        cfg = self.cfg
        check_controls(cfg.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        prompts = prepare_prompts(prompts, cfg.block_size, max_new_tokens, truncate_prompt)
        stop_list = sorted({int(t) for t in stop_tokens})
        for t in stop_list:
            if not 0 <= t < cfg.vocab_size:
                raise UserError(f"stop token {t} is outside the vocabulary [0, {cfg.vocab_size})")
        b = len(prompts)
        lengths = [len(p) for p in prompts]
        p_len, n_len = _lengths(max(lengths), max_new_tokens, cfg.block_size)
        tokens = np.zeros((b, p_len), np.int32)
        mask = np.zeros((b, p_len), bool)
        for i, p in enumerate(prompts):
            tokens[i, p_len - len(p):] = p
            mask[i, p_len - len(p):] = True
        row_keys = _row_keys(np.uint32(seed), b) if row_keys is None else jnp.asarray(row_keys)
        if row_keys.shape[0] != b:
            raise UserError(f"row_keys has {row_keys.shape[0]} keys for {b} prompts")
        stops = np.full((_pow2_at_least(len(stop_list), 4),), -1, np.int32)
        stops[: len(stop_list)] = stop_list
        greedy = temperature == 0
        s = _Static(
            cfg=cfg,
            cache_len=p_len + n_len,
            greedy=greedy,
            use_k=not greedy and top_k > 0,
            use_p=not greedy and top_p < 1.0,
            m=_candidates(cfg.vocab_size, top_k),
        )
        controls = (
            np.float32(temperature if temperature > 0 else 1.0),
            np.int32(max(top_k, 1)),
            np.float32(1.0 - top_p),
            stops,
        )
        t0 = time.perf_counter()
        state = _start(self.params, self.kernels, tokens, mask, row_keys, *controls, s=s, n_out=n_len)
        state = jax.block_until_ready(state)
        ttft = time.perf_counter() - t0
        emitted = [[] for _ in range(b)]
        stopped = [False] * b
        sent = 0

        def collect(out: np.ndarray, upto: int) -> list[list[int]]:
            new_rows = []
            for i in range(b):
                row = []
                if not stopped[i]:
                    for tok in out[i, sent:upto]:
                        if int(tok) in stop_list:
                            stopped[i] = True
                            break
                        row.append(int(tok))
                emitted[i].extend(row)
                new_rows.append(row)
            return new_rows

        def result(finished: bool) -> Generation:
            return Generation([list(r) for r in emitted], list(stopped), lengths, ttft, time.perf_counter() - t0, finished)

        while True:
            t_now = int(state["t"])
            finished = t_now >= max_new_tokens or bool(np.all(np.asarray(state["done"])))
            if chunk is not None or finished:
                new_rows = collect(np.asarray(state["out"]), t_now)
                sent = t_now
                yield new_rows, result(finished)
            if finished:
                return
            limit = min(max_new_tokens, t_now + chunk) if chunk else max_new_tokens
            state = _advance(self.params, self.kernels, state, np.int32(limit), row_keys, *controls, s=s)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], **controls: Any) -> Generation:
        """New tokens for each prompt (a list of token ids); see `stream` for the controls."""
        result = None
        for _, result in self.stream(prompts, **controls):
            pass
        assert result is not None
        return result


def generate_tokens(cfg: GPTConfig, params: Any, prompts: Sequence[Sequence[int]], **controls: Any) -> list[list[int]]:
    """New token ids per prompt; a functional shortcut for `Decoder(cfg, params).generate_tokens`."""
    return Decoder(cfg, params).generate_tokens(prompts, **controls).tokens


# --------------------------------------------------------------------------- loaded model


class LoadedModel:
    """A run's config, parameters and tokenizer, ready to generate text.

    `generate(prompts, **controls)` returns one string per prompt (the new text only);
    `generate_tokens` works on token ids. Controls: max_new_tokens, temperature (0 = greedy),
    top_k (0 = off), top_p (1.0 = off), stop_tokens (default: the tokenizer's end-of-text),
    seed, truncate_prompt (cut too-long prompts from the left).
    """

    def __init__(self, config: Any, params: Any, tokenizer: Any, model_config: GPTConfig | None = None):
        self.config = config
        self.model_config = model_config or GPTConfig.from_config(config.model.to_dict())
        self.params = params
        self.tokenizer = tokenizer
        self.decoder = Decoder(self.model_config, params)

    def _controls(self, controls: dict[str, Any]) -> dict[str, Any]:
        controls = dict(controls)
        if controls.get("stop_tokens") is None:
            controls["stop_tokens"] = (self.tokenizer.eot_id,)
        return controls

    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a string or a list of strings")
        if not prompts:
            raise UserError("give at least one prompt (a non-empty list)")
        encoded = []
        for p in prompts:
            ids = self.tokenizer.encode(p)
            encoded.append(ids if ids else [self.tokenizer.eot_id])  # '' means: start of a document
        return encoded

    def stream(self, prompts: str | Sequence[str], chunk: int = 16, **controls: Any) -> Iterator[tuple[list[str], Generation]]:
        """Yield (new text per row since the last yield, result so far) every `chunk` tokens."""
        decoded = [[] for _ in range(len(prompts) if not isinstance(prompts, str) else 1)]
        shown = [""] * len(decoded)
        for new_rows, result in self.decoder.stream(self.encode(prompts), chunk=chunk, **self._controls(controls)):
            pieces = []
            for i, row in enumerate(new_rows):
                decoded[i].extend(row)
                text = self.tokenizer.decode(decoded[i])
                # Hold back a trailing replacement character (a multi-byte character split
                # between chunks) until the end; if decoding more tokens changed text already
                # shown, continue from the common prefix.
                stable = text if result.finished else text.rstrip("\ufffd")
                common = os.path.commonprefix([shown[i], stable])
                pieces.append(stable[len(common):])
                shown[i] = stable
            yield pieces, result

    def generate_tokens(self, prompts: Sequence[Sequence[int]], **controls: Any) -> list[list[int]]:
        """New token ids per prompt (lists of ids); the stop token is not included."""
        return self.decoder.generate_tokens(prompts, **self._controls(controls)).tokens

    def generate(self, prompts: str | Sequence[str], **controls: Any) -> list[str]:
        """New text per prompt, cut at the first stop token."""
        result = self.decoder.generate_tokens(self.encode(prompts), **self._controls(controls))
        return [self.tokenizer.decode(t) for t in result.tokens]


def load(path: str) -> LoadedModel:
    """Load a workdir or a checkpoint step directory for sampling, on the CPU.

    Works for a checkpoint trained on any mesh: parameters come back as single-device arrays.
    """
    from gptjax.checkpoint import load_for_inference, resolve_run
    from gptjax.tokenizer import load_tokenizer

    workdir, _ = resolve_run(str(path))
    config, params = load_for_inference(str(path))
    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise UserError(f"{workdir!r} has no tokenizer/ directory; is it a gptjax run?")
    return LoadedModel(config, params, load_tokenizer(tok_dir))
