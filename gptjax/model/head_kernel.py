"""The head's cross entropy as Pallas kernels that never write logits to HBM (`model.head_loss`).

`kernel_token_losses(hidden, table, targets, valid, softcap)` gives each token's loss
logsumexp(logits) - logits[target] of the head's logits `hidden @ table.T`, differentiable in
`hidden` and `table`. Two kernels over a grid of (token block i, vocabulary block j), j innermost:

- forward: the [vocab block, token block] logits tile is made in VMEM (fp32 accumulation),
  folded into a running max and sum of exponentials per token (online softmax), and the
  target's logit picked where the row is the target; only each token's logsumexp and loss
  leave the chip.
- backward: the tile is made again, g = (softmax - one-hot) * d(loss) (through the softcap's
  chain rule) formed in VMEM, d hidden accumulated over j in VMEM and written at the last j,
  and each token block's fp32 d table block written once per (i, j), the token blocks'
  partials summed by XLA (as cheap in bytes as reading and writing back one accumulator per
  token block, and with no block revisited: cheap when token blocks are large, and the same
  in Pallas interpret mode as on the chip).

The logits tile is laid out [vocabulary, tokens], so that per-token values (targets, weights,
logsumexp) are rows of lanes. Rows of the table from `valid` on (the padded vocabulary) and
the vocabulary grid's tail past the table are masked out of every sum and gradient. Under a
mesh the kernels run per shard in `jax.shard_map` (tokens split as the logical axis `batch`,
the table whole), d table summed over the batch shards. Not on a TPU the same kernel code runs
in Pallas interpret mode (slow: for tests and the reference comparison).

The AOT tool counts these kernels from the block sizes recorded in their metadata
(`gptjax.aot.kernels.head_ce_cost`): the compiler's cost analysis sees neither their FLOPs
nor their traffic.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from gptjax import sharding
from gptjax.chips import chip_for_device_kind
from gptjax.errors import UserError
from gptjax.model.platform import trace_platform

# A token block's hidden elements on a chip with 128 MiB of VMEM per core (v5e, v6e: 8,192 tokens
# of GPT-2's 768; fewer tokens for a wider model, and in proportion on a chip with less VMEM):
# the table is read, and a d table partial written, once per token block, so blocks are large;
# the block's hidden, its d hidden (and fp32 accumulator) and the logits tile must fit VMEM.
BLOCK_ELEMENTS = 8192 * 768
# Table rows per block (a multiple of 128), likewise in proportion to VMEM: with 512 the 124M
# recipe's backward on v5e:2x2 (collective_matmul off) needed 109.5 MiB of VMEM, over its limit.
BLOCK_VOCAB = 256
VMEM_MIB = 128  # the VMEM the blocks above are sized for; and assumed where the chip is not known
VMEM_LIMIT_SHARE = 0.8  # the share of a core's VMEM the kernels may use
KERNEL_TAG = "head_ce"  # in the kernels' metadata: how the AOT counts know them
# Off a TPU: Pallas's interpret mode (True: the HLO interpreter; a `pltpu.InterpretParams`
# simulates the TPU's memories and DMAs, slower, for tests of the kernels' block traffic).
INTERPRET: Any = True
_TRANS_B = (((1,), (1,)), ((), ()))  # x @ y.T


def kernel_token_losses(hidden_BxTxC: jax.Array, table_VxC: jax.Array, targets_BxT: jax.Array, valid: int,
                        softcap: float = 0.0) -> jax.Array:
    """Each token's cross-entropy loss [B, T] (fp32, unweighted) of the logits `hidden @ table.T`
    (the table cast to hidden's dtype), rows from `valid` on left out; `softcap` > 0: logits
    `softcap * tanh(logits / softcap)`. Differentiable in hidden and table (d table in fp32)."""
    if trace_platform() == "gpu":
        raise UserError("model.head_loss='kernel' is a TPU kernel; on a GPU use 'xla' or 'auto'")
    return _losses(int(valid), float(softcap), hidden_BxTxC, table_VxC, targets_BxT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _losses(valid: int, softcap: float, hidden: jax.Array, table: jax.Array, targets: jax.Array) -> jax.Array:
    return _forward(valid, softcap, hidden, table, targets)[0]


def _losses_fwd(valid: int, softcap: float, hidden: jax.Array, table: jax.Array, targets: jax.Array) -> Any:
    losses, lse = _forward(valid, softcap, hidden, table, targets)
    return losses, (hidden, table, targets, lse)


def _losses_bwd(valid: int, softcap: float, res: Any, g_BxT: jax.Array) -> Any:
    hidden, table, targets, lse = res
    args = (hidden, table.astype(hidden.dtype), targets, lse, g_BxT)
    dh, dw = _sharded(functools.partial(_backward_shard, valid, softcap), args,
                      ("tokens", "table", "tokens", "tokens", "tokens"), ("tokens", "table_sum"))
    return dh, dw.astype(table.dtype), None


_losses.defvjp(_losses_fwd, _losses_bwd)


def _forward(valid: int, softcap: float, hidden: jax.Array, table: jax.Array, targets: jax.Array) -> Any:
    return _sharded(functools.partial(_forward_shard, valid, softcap), (hidden, table.astype(hidden.dtype), targets),
                    ("tokens", "table", "tokens"), ("tokens", "tokens"))


def _sharded(fn: Any, args: tuple, in_kinds: tuple[str, ...], out_kinds: tuple[str, ...]) -> Any:
    """`fn(*args)` per batch shard under the active mesh (whole without one). Kinds: "tokens"
    ([B, ...], split as `batch`), "table" (whole on every shard), "table_sum" (an output summed
    over the batch shards)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    batch = sharding.activation_mesh_axes(mesh, "batch")
    spec = lambda kind, x: P() if kind.startswith("table") else P(batch, *([None] * (x.ndim - 1)))
    summed = tuple(i for i, k in enumerate(out_kinds) if k == "table_sum")

    def body(*xs: jax.Array) -> Any:
        outs = list(fn(*xs))
        for i in summed:
            outs[i] = outs[i] if batch is None else lax.psum(outs[i], batch)
        return tuple(outs)

    out_specs = tuple(P() if k.startswith("table") else P(batch) for k in out_kinds)
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(spec(k, x) for k, x in zip(in_kinds, args)),
                         out_specs=out_specs, check_vma=False)(*args)


def _vmem_mib() -> int:
    """VMEM per core of the chip the program is traced for (`gptjax.chips`), else VMEM_MIB."""
    mesh = jax.sharding.get_abstract_mesh()
    chip = None if mesh.empty else chip_for_device_kind(mesh.abstract_device.device_kind)
    return chip.vmem_mib if chip is not None and chip.vmem_mib else VMEM_MIB


def _blocks(n: int, c: int, v: int, valid: int) -> tuple[int, int, int, int]:
    """(token block, padded token count, vocabulary block, vocabulary blocks) for n tokens and a
    [v, c] table of which `valid` rows are real. A token block is all n tokens if they fit
    the chip's share of BLOCK_ELEMENTS, else the largest multiple of 128 that fits and divides n
    (n padded when none does)."""
    vmem = _vmem_mib()
    cap = max(128, BLOCK_ELEMENTS * vmem // VMEM_MIB // c // 128 * 128)
    tm = n if n <= cap else max([m for m in range(128, cap + 1, 128) if n % m == 0], default=cap)
    tv = min(max(128, BLOCK_VOCAB * vmem // VMEM_MIB // 128 * 128), -(-valid // 128) * 128)
    tv = v if tv > v else tv  # a table smaller than one block: the block is the whole table
    return tm, -(-n // tm) * tm, tv, -(-valid // tv)


def _flat(hidden: jax.Array, n_pad: int, targets: jax.Array, *rows: jax.Array) -> Any:
    """hidden [N, C] and the [1, N] rows of targets and of `rows`, tokens padded to `n_pad`."""
    b, t, c = hidden.shape
    n = b * t
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n_pad - n)))
    h = jnp.pad(hidden.reshape(n, c), ((0, n_pad - n), (0, 0)))
    return h, pad(targets.reshape(1, n).astype(jnp.int32)), [pad(r.reshape(1, n).astype(jnp.float32)) for r in rows]


def _params(kind: str, n: int, c: int, v: int, valid: int, tm: int, tv: int, itemsize: int) -> dict:
    meta = dict(kernel=KERNEL_TAG, pass_=kind, tokens=n, embed=c, rows=v, valid=valid, block_tokens=tm,
                block_vocab=tv, itemsize=itemsize)
    return dict(
        name=f"gptjax_head_ce_{kind}",
        metadata={"xprof_metadata": json.dumps(meta)},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=int(VMEM_LIMIT_SHARE * _vmem_mib() * 2**20)),
        interpret=False if trace_platform() == "tpu" else INTERPRET,
    )


def _logits(h_ref: Any, w_ref: Any, j: Any, tv: int, valid: int, softcap: float) -> tuple[jax.Array, ...]:
    """(the [tv, tm] logits tile with rows past `valid` at -inf, the tanh of the softcap or None,
    the tile's row ids)."""
    s = lax.dot_general(w_ref[...], h_ref[...], _TRANS_B, preferred_element_type=jnp.float32)
    z = None
    if softcap:
        z = jnp.tanh(s * (1.0 / softcap))
        s = softcap * z
    row = j * tv + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    return jnp.where(row < valid, s, -jnp.inf), z, row


def _forward_shard(valid: int, softcap: float, hidden: jax.Array, table: jax.Array, targets: jax.Array) -> Any:
    b, t, c = hidden.shape
    v = table.shape[0]
    tm, n_pad, tv, nv = _blocks(b * t, c, v, valid)
    h, tg, _ = _flat(hidden, n_pad, targets)

    def kernel(tg_ref: Any, h_ref: Any, w_ref: Any, loss_ref: Any, lse_ref: Any, m_ref: Any, l_ref: Any, t_ref: Any) -> None:
        j = pl.program_id(1)

        @pl.when(j == 0)
        def _() -> None:
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            t_ref[...] = jnp.zeros(t_ref.shape, jnp.float32)

        s, _, row = _logits(h_ref, w_ref, j, tv, valid, softcap)
        m_old = m_ref[...]
        m_new = jnp.maximum(m_old, s.max(axis=0, keepdims=True))
        l_ref[...] = l_ref[...] * jnp.exp(m_old - m_new) + jnp.exp(s - m_new).sum(axis=0, keepdims=True)
        m_ref[...] = m_new
        t_ref[...] += jnp.where(row == tg_ref[...], s, 0.0).sum(axis=0, keepdims=True)

        @pl.when(j == nv - 1)
        def _() -> None:
            lse = m_ref[...] + jnp.log(l_ref[...])
            lse_ref[...] = lse
            loss_ref[...] = lse - t_ref[...]

    tok = pl.BlockSpec((1, tm), lambda i, j: (0, i))
    losses, lse = pl.pallas_call(
        kernel,
        grid=(n_pad // tm, nv),
        in_specs=[tok, pl.BlockSpec((tm, c), lambda i, j: (i, 0)), pl.BlockSpec((tv, c), lambda i, j: (j, 0))],
        out_specs=[tok, tok],
        out_shape=[jax.ShapeDtypeStruct((1, n_pad), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((1, tm), jnp.float32)] * 3,
        **_params("fwd", n_pad, c, v, valid, tm, tv, h.dtype.itemsize),
    )(tg, h, table)
    n = b * t
    return losses[0, :n].reshape(b, t), lse[0, :n].reshape(b, t)


def _backward_shard(valid: int, softcap: float, hidden: jax.Array, table: jax.Array, targets: jax.Array,
                    lse: jax.Array, g: jax.Array) -> Any:
    b, t, c = hidden.shape
    v = table.shape[0]
    tm, n_pad, tv, nv = _blocks(b * t, c, v, valid)
    h, tg, (lse_row, g_row) = _flat(hidden, n_pad, targets, lse, g)

    def kernel(tg_ref: Any, g_ref: Any, lse_ref: Any, h_ref: Any, w_ref: Any, dh_ref: Any, dw_ref: Any,
               acc_ref: Any) -> None:
        j = pl.program_id(1)
        s, z, row = _logits(h_ref, w_ref, j, tv, valid, softcap)
        d = (jnp.exp(s - lse_ref[...]) - (row == tg_ref[...]).astype(jnp.float32)) * g_ref[...]
        if softcap:
            d = d * (1.0 - z * z)
        d = jnp.where(row < valid, d, 0.0).astype(h_ref.dtype)  # [tv, tm]
        w_row = j * tv + lax.broadcasted_iota(jnp.int32, w_ref.shape, 0)
        w = jnp.where(w_row < valid, w_ref[...], jnp.zeros((), w_ref.dtype))  # the grid's tail: not the table's

        @pl.when(j == 0)
        def _() -> None:
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        acc_ref[...] += lax.dot(d.T, w, preferred_element_type=jnp.float32)
        dw_ref[...] = lax.dot(d, h_ref[...], preferred_element_type=jnp.float32)

        @pl.when(j == nv - 1)
        def _() -> None:
            dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)

    ni, covered = n_pad // tm, min(v, nv * tv)
    tok = pl.BlockSpec((1, tm), lambda i, j: (0, i))
    hid = pl.BlockSpec((tm, c), lambda i, j: (i, 0))
    dh, dw = pl.pallas_call(
        kernel,
        grid=(ni, nv),
        in_specs=[tok, tok, tok, hid, pl.BlockSpec((tv, c), lambda i, j: (j, 0))],
        out_specs=[hid, pl.BlockSpec((None, tv, c), lambda i, j: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((n_pad, c), h.dtype), jax.ShapeDtypeStruct((ni, covered, c), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((tm, c), jnp.float32)],
        **_params("bwd", n_pad, c, v, valid, tm, tv, h.dtype.itemsize),
    )(tg, g_row, lse_row, h, table)
    # d table: the token blocks' partial sums added (rows past the grid, all padding, get zeros)
    dw = jnp.pad(dw.sum(axis=0), ((0, v - covered), (0, 0)))
    return dh[: b * t].reshape(b, t, c).astype(hidden.dtype), dw
