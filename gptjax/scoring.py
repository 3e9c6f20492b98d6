"""Per-example log-likelihoods of token continuations, batched and jitted on the device.

The one forward pass that evaluation builds on: lm-evaluation-harness's `loglikelihood` and
`loglikelihood_rolling` (`gptjax.lm_eval`), bits per byte and multiple-choice scoring all ask
"how likely is this continuation after that context?" for many pairs at once.

`Scorer.loglikelihoods` takes (context ids, continuation ids) pairs and returns, per pair, the
summed log-probability of the continuation, its length in tokens, and whether every one of its
tokens is the model's argmax (lm-eval's `is_greedy`). A pair longer than the context window
keeps its last block_size + 1 tokens (the context is cut from the left, as lm-eval's `hf`
model cuts it). Pairs are sorted longest first and scored in batches of fixed rows, each
right-padded to a power-of-two length (so a handful of programs serve any set of lengths);
padding never affects the real tokens, whose attention is causal. On a mesh the rows are
split over its data and fsdp axes and the parameters stay as `gptjax.sampling.api.load`
placed them.

`Scorer.rolling` scores every token of whole documents through `rolling_windows`, the windows
lm-eval's `loglikelihood_rolling` uses, so its sums equal lm-eval's on the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax.errors import UserError
from gptjax.model.config import GPTConfig

LOGITS_BUDGET_BYTES = 2**30  # auto batch size: rows whose fp32 logits fit in this many bytes
MAX_AUTO_ROWS = 64
_MIN_LENGTH = 8


@dataclasses.dataclass(frozen=True)
class Score:
    """One pair's result: sum of log p(continuation token | all before it), its token count,
    and whether each continuation token is the argmax of its distribution."""

    logprob: float
    tokens: int
    greedy: bool


def rolling_windows(doc: Sequence[int], prefix: int, block_size: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that predict every token of `doc` once, `prefix` first.

    The same windows as lm-eval's `get_rolling_token_windows(doc, prefix, block_size,
    context_len=1)` followed by `make_disjoint_window`: consecutive continuations of
    block_size tokens, the first after `prefix` alone, each later one after the tokens that
    fill its window; the last, shorter one has a full window of context.
    """
    doc = [int(t) for t in doc]
    if not doc:
        return
    first = min(block_size, len(doc))
    yield [int(prefix)], doc[:first]
    done = first
    while done < len(doc):
        n = min(len(doc) - done, block_size)
        end = done + n
        yield doc[end - block_size - 1 : end - n], doc[end - n : end]
        done = end


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(cfg: GPTConfig, params: Any, tokens_BxT: jax.Array, targets_BxT: jax.Array,
                weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted target log-probabilities [B], every weighted target the argmax [B])."""
    from gptjax.model import GPT

    logits_BxTxV = GPT(cfg).apply({"params": params}, tokens_BxT).astype(jnp.float32)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    match_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    weighted = weights_BxT > 0
    return jnp.where(weighted, target_BxT, 0.0).sum(axis=1), jnp.all(match_BxT | ~weighted, axis=1)


def _bucket(n: int, block_size: int) -> int:
    return min(block_size, max(_MIN_LENGTH, 1 << max(0, n - 1).bit_length()))


class Scorer:
    """A model's per-example log-likelihoods (see the module docstring).

    batch_size: rows per call; 0 chooses as many as keep the call's fp32 logits under
    LOGITS_BUDGET_BYTES (at most MAX_AUTO_ROWS). On a mesh, rows are rounded up to a multiple
    of its data-parallel size.
    """

    def __init__(self, cfg: GPTConfig, params: Any, *, batch_size: int = 0, mesh: Mesh | None = None):
        if batch_size < 0:
            raise UserError(f"batch_size must be >= 0 (0 = automatic), got {batch_size}")
        self.cfg = cfg
        self.params = params
        self.batch_size = batch_size
        self.mesh = mesh

    def _rows(self, length: int) -> int:
        rows = self.batch_size or max(1, min(MAX_AUTO_ROWS, LOGITS_BUDGET_BYTES // (length * self.cfg.vocab_size * 4)))
        if self.mesh is not None:
            from gptjax.sharding import data_parallel_size

            dp = data_parallel_size(self.mesh)
            rows = -(-rows // dp) * dp
        return rows

    def _put(self, x: np.ndarray) -> Any:
        if self.mesh is None:
            return x
        from gptjax.sharding import batch_sharding

        return jax.device_put(x, batch_sharding(self.mesh))

    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False,
                       desc: str = "scoring") -> list[Score]:
        """One `Score` per (context ids, continuation ids) pair, in the order given."""
        block = self.cfg.block_size
        rows: list[list[int]] = []
        for i, (context, continuation) in enumerate(pairs):
            context, continuation = [int(t) for t in context], [int(t) for t in continuation]
            if not context or not continuation:
                raise UserError(f"pair {i}: the context and the continuation must each have at least one token")
            if len(continuation) > block:
                raise UserError(f"pair {i}: a continuation of {len(continuation)} tokens is longer than block_size={block}")
            for t in context + continuation:
                if not 0 <= t < self.cfg.vocab_size:
                    raise UserError(f"pair {i}: token {t} is outside the vocabulary [0, {self.cfg.vocab_size})")
            rows.append((context + continuation)[-(block + 1):])
        lengths = [len(c) for _, c in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[Score | None] = [None] * len(rows)
        bar = _progress(len(rows), progress, desc)
        start = 0
        while start < len(order):
            t = _bucket(len(rows[order[start]]) - 1, block)
            b = self._rows(t)
            batch = order[start : start + b]
            tokens, targets, weights = (np.zeros((b, t), np.int32) for _ in range(3))
            for r, i in enumerate(batch):
                row, n = rows[i], lengths[i]
                tokens[r, : len(row) - 1] = row[:-1]
                targets[r, : len(row) - 1] = row[1:]
                weights[r, len(row) - 1 - n : len(row) - 1] = 1
            sums, greedy = jax.device_get(
                _score_rows(self.cfg, self.params, self._put(tokens), self._put(targets), self._put(weights))
            )
            for r, i in enumerate(batch):
                out[i] = Score(float(sums[r]), lengths[i], bool(greedy[r]))
            start += len(batch)
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def rolling(self, docs: Sequence[Sequence[int]], prefix: int, progress: bool = False) -> list[float]:
        """Sum of log p of every token of each document (`rolling_windows`, `prefix` first)."""
        pairs, owner = [], []
        for d, doc in enumerate(docs):
            for pair in rolling_windows(doc, prefix, self.cfg.block_size):
                pairs.append(pair)
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, score in zip(owner, self.loglikelihoods(pairs, progress, desc="rolling windows")):
            totals[d] += score.logprob
        return totals


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc)
