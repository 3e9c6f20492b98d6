"""The losses: token cross entropy, and the output head's chunked cross entropy (training and evaluation).

Both return (sum of weighted token losses, sum of weights) so that callers can accumulate
over micro-batches and devices before dividing once. The tied head's table may have padded
rows (`model.vocab_multiple`): given the real `vocab_size`, their logits are masked out of the
softmax, so the loss and every gradient are those of the unpadded table (padded rows get zero).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.model.head_kernel import kernel_token_losses
from gptjax.model.platform import trace_platform

LOGITS_CHUNK_BYTES = 64 * 2**20  # the most fp32 logits head_cross_entropy makes at once on a CPU
# ... on a TPU or GPU. Each chunk reads the whole (all-gathered) bf16 table twice and reads and
# writes its fp32 gradient accumulator once: about 230 MB per chip for GPT-2's 50,304 x 768
# over fsdp=4, which a chunk of 256 tokens (64 MiB at 16 rows per chip) pays at 0.9 MB of HBM
# traffic per token and one of 4,096 tokens (1 GiB) at 0.06 MB.
ACCELERATOR_LOGITS_CHUNK_BYTES = 2**30  # both: the defaults of model.logits_chunk_mib=0


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights); fp32 log-softmax over the vocabulary."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return ((logz_BxT - target_logit_BxT) * weights_BxT).sum(), weights_BxT.sum()


def _seq_chunks(b: int, t: int, vocab: int, budget: int = 0) -> int:
    """The fewest sequence chunks (a divisor of t) whose fp32 logits fit `budget` bytes per chip
    (0: the platform's, LOGITS_CHUNK_BYTES on a CPU, ACCELERATOR_LOGITS_CHUNK_BYTES on a TPU or GPU)."""
    budget = budget or (LOGITS_CHUNK_BYTES if trace_platform() == "cpu" else ACCELERATOR_LOGITS_CHUNK_BYTES)
    rows = -(-b // _batch_shards())  # the rows of one chip: inside a sharded step b is the global batch
    for n in range(1, t + 1):
        if t % n == 0 and rows * (t // n) * vocab * 4 <= budget:
            return n
    return t


def _batch_shards() -> int:
    """How many ways the active mesh (`jax.set_mesh`, as the steps run under) splits the batch:
    its data and fsdp axes (`gptjax.sharding.RULES`); 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))


def head_cross_entropy(
    hidden_BxTxC: jax.Array, embedding_VxC: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
    vocab_size: int | None = None, softcap: float = 0.0, chunk_bytes: int = 0, kernel: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy` of the head's logits `hidden @ embedding.T`, never holding them whole.

    `embedding` is the head's [vocab, embed] table (the tied `wte`, or an untied head).
    `vocab_size`: the real vocabulary when the table has padded rows past it (default: all rows).
    `softcap` > 0: the logits are `softcap * tanh(logits / softcap)` (`model.logit_softcap`).
    `chunk_bytes`: the most fp32 logits per chip made at once (0: the platform's default).
    `kernel`: by the Pallas kernels of `gptjax.model.head_kernel` (`model.head_loss`), which
    keep every logits tile on chip; `chunk_bytes` is then unused.

    The logits are made a sequence chunk at a time. Under differentiation the forward pass
    also computes each chunk's gradients with respect to `hidden` and `embedding` while the
    chunk is at hand (softmax - one-hot, two matmuls: the FLOPs autodiff would spend), so no
    [batch, seq, vocab] array, nor its gradient or transposed copy, is ever made.
    """
    valid = _valid_rows(embedding_VxC, vocab_size)
    if kernel:
        return _kernel_sums(hidden_BxTxC, embedding_VxC, targets_BxT, weights_BxT, valid, softcap)[0]
    return _head_ce_vjp(valid, float(softcap), int(chunk_bytes), hidden_BxTxC, embedding_VxC, targets_BxT, weights_BxT)


def _valid_rows(embedding_VxC: jax.Array, vocab_size: int | None) -> int:
    """The table's real rows: `vocab_size`, or all of them."""
    return embedding_VxC.shape[0] if vocab_size is None else int(vocab_size)


def _kernel_sums(hidden_BxTxC: jax.Array, embedding_VxC: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                 valid: int, softcap: float) -> Any:
    """(sums, token losses [B, T]) by the Pallas kernels of `gptjax.model.head_kernel`."""
    losses_BxT = kernel_token_losses(hidden_BxTxC, embedding_VxC, targets_BxT, valid, softcap)
    return ((losses_BxT * weights_BxT).sum(), weights_BxT.sum()), losses_BxT


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _head_ce_vjp(
    valid: int, softcap: float, chunk_bytes: int, hidden_BxTxC: jax.Array, embedding_VxC: jax.Array,
    targets_BxT: jax.Array, weights_BxT: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    sums, _, _, _ = _head_ce(hidden_BxTxC, embedding_VxC, targets_BxT, weights_BxT, grads=False, valid=valid,
                             softcap=softcap, chunk_bytes=chunk_bytes)
    return sums


def _head_ce(
    hidden_BxTxC: jax.Array, embedding_VxC: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array, grads: bool,
    valid: int | None = None, softcap: float = 0.0, chunk_bytes: int = 0,
) -> Any:
    """(sums, token losses [B, T], d hidden [B, T, C] or None, d embedding [V, C] or None);
    rows of the table from `valid` on are padding (masked out); `softcap` and `chunk_bytes` as
    in `head_cross_entropy`."""
    b, t, _ = hidden_BxTxC.shape
    vocab = embedding_VxC.shape[0]
    n = _seq_chunks(b, t, vocab, chunk_bytes)
    w_VxC = embedding_VxC.astype(hidden_BxTxC.dtype)
    on_cpu = trace_platform() == "cpu"
    real_1x1xV = None if valid is None or valid >= vocab else (jnp.arange(vocab) < valid)[None, None]

    def chunk(h_BxSxC: jax.Array, tg_BxS: jax.Array, wt_BxS: jax.Array) -> Any:
        # S: the chunk's sequence length (t // n).
        logits_BxSxV = jnp.einsum("btc,vc->btv", h_BxSxC, w_VxC, preferred_element_type=jnp.float32)
        if softcap:
            tanh_BxSxV = jnp.tanh(logits_BxSxV / softcap)
            logits_BxSxV = softcap * tanh_BxSxV
        if real_1x1xV is not None:  # padded rows: exp() of them is 0, so they are in no sum or gradient
            logits_BxSxV = jnp.where(real_1x1xV, logits_BxSxV, jnp.finfo(jnp.float32).min)
        top_BxSx1 = logits_BxSxV.max(axis=-1, keepdims=True)
        e_BxSxV = jnp.exp(logits_BxSxV - top_BxSx1)  # one exp pass serves the loss and its gradient
        total_BxS = e_BxSxV.sum(axis=-1)
        if on_cpu:
            target_BxS = jnp.take_along_axis(logits_BxSxV, tg_BxS[..., None], axis=-1)[..., 0]
        else:
            # The target's logit from its own table row, not picked out of the logits: a gather of
            # [B, S, C] rows instead of another pass over the [B, S, V] chunk in HBM. (On a CPU the
            # logits are at hand in cache, and picking keeps the reference's arithmetic.)
            target_BxS = jnp.einsum("bsc,bsc->bs", h_BxSxC.astype(jnp.float32), w_VxC[tg_BxS].astype(jnp.float32))
            if softcap:
                target_BxS = softcap * jnp.tanh(target_BxS / softcap)
        losses_BxS = jnp.log(total_BxS) + top_BxSx1[..., 0] - target_BxS
        if not grads:
            return losses_BxS, None, None
        # d(loss)/d(logits) = softmax - one_hot, made once; both matmuls read it as it lies.
        onehot_BxSxV = tg_BxS[..., None] == jnp.arange(vocab, dtype=tg_BxS.dtype)
        dlogits_BxSxV = (e_BxSxV * (1.0 / total_BxS)[..., None] - onehot_BxSxV) * wt_BxS[..., None]
        if softcap:  # through the cap: d(cap * tanh(z / cap)) / dz = 1 - tanh^2
            dlogits_BxSxV = dlogits_BxSxV * (1.0 - tanh_BxSxV * tanh_BxSxV)
        dlogits_BxSxV = dlogits_BxSxV.astype(hidden_BxTxC.dtype)
        dh_BxSxC = jnp.einsum("btv,vc->btc", dlogits_BxSxV, w_VxC, preferred_element_type=jnp.float32)
        if hidden_BxTxC.dtype == jnp.float32:
            # [C, V] = h^T @ dlogits, then one small transpose: measured faster on CPU in fp32.
            dw_VxC = jnp.einsum("btc,btv->cv", h_BxSxC, dlogits_BxSxV, preferred_element_type=jnp.float32).T
        else:
            # XLA's CPU runtime folds the transpose above into a bf16 x bf16 -> f32 dot its
            # fallback kernel cannot run ("Unsupported element type for DotThunk"); this
            # orientation stays on its fast path.
            dw_VxC = jnp.einsum("btv,btc->vc", dlogits_BxSxV, h_BxSxC, preferred_element_type=jnp.float32)
        return losses_BxS, dh_BxSxC, dw_VxC

    if n == 1:
        losses_BxT, dh_BxTxC, dw_VxC = chunk(hidden_BxTxC, targets_BxT, weights_BxT)
    else:
        split = lambda x: jnp.moveaxis(x.reshape(b, n, t // n, *x.shape[2:]), 1, 0)  # [B, T, ...] -> [N, B, S, ...]
        merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t, *x.shape[3:])  # [N, B, S, ...] -> [B, T, ...]

        def body(acc: jax.Array, xs: Any) -> Any:
            losses, dh, dw = chunk(*xs)
            return (acc + dw if grads else acc), (losses, dh)

        acc = jnp.zeros(embedding_VxC.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32)
        dw_VxC, (losses, dh) = jax.lax.scan(body, acc, (split(hidden_BxTxC), split(targets_BxT), split(weights_BxT)))
        losses_BxT, dh_BxTxC = merge(losses), (merge(dh) if grads else None)
    return ((losses_BxT * weights_BxT).sum(), weights_BxT.sum()), losses_BxT, dh_BxTxC, dw_VxC


def _head_ce_fwd(valid: int, softcap: float, chunk_bytes: int, hidden: jax.Array, embedding: jax.Array,
                 targets: jax.Array, weights: jax.Array) -> Any:
    sums, losses, dh, dw = _head_ce(hidden, embedding, targets, weights, grads=True, valid=valid, softcap=softcap,
                                    chunk_bytes=chunk_bytes)
    return sums, (losses, dh.astype(hidden.dtype), dw.astype(embedding.dtype))


def _head_ce_bwd(valid: int, softcap: float, chunk_bytes: int, res: Any, g: tuple[jax.Array, jax.Array]) -> Any:
    losses, dh, dw = res
    g_loss, g_weight = g
    return (g_loss * dh).astype(dh.dtype), g_loss * dw, None, g_loss * losses + g_weight


_head_ce_vjp.defvjp(_head_ce_fwd, _head_ce_bwd)


def head_eval_sums(
    hidden_BxTxC: jax.Array,
    embedding_VxC: jax.Array,
    targets_BxT: jax.Array,
    weights_BxT: jax.Array,
    sources_BxS: jax.Array | None = None,
    vocab_size: int | None = None,
    softcap: float = 0.0,
    chunk_bytes: int = 0,
    kernel: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`head_cross_entropy` for evaluation (not differentiable), optionally split by source.

    Without `sources_BxS`: (loss sum, weight sum), scalars. With a one-hot `sources_BxS`:
    (loss sums [S], weight sums [S]), each row counted for the source it names (a row of zeros
    counts nowhere). `vocab_size`, `softcap`, `chunk_bytes` and `kernel` as in `head_cross_entropy`. The
    logits are made a sequence chunk at a time, as in training, so an eval batch never holds
    [batch, seq, vocab] of them.
    """
    if kernel:
        sums, losses_BxT = _kernel_sums(hidden_BxTxC, embedding_VxC, targets_BxT, weights_BxT,
                                        _valid_rows(embedding_VxC, vocab_size), softcap)
    else:
        sums, losses_BxT, _, _ = _head_ce(hidden_BxTxC, embedding_VxC, targets_BxT, weights_BxT, grads=False,
                                        valid=vocab_size, softcap=softcap, chunk_bytes=chunk_bytes)
    if sources_BxS is None:
        return sums
    return (losses_BxT * weights_BxT).sum(axis=1) @ sources_BxS, weights_BxT.sum(axis=1) @ sources_BxS
