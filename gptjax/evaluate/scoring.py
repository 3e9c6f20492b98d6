"""Log-likelihoods of continuations: the one scoring function behind multiple-choice accuracy
(`gptjax.evaluate.multiple_choice`) and the lm-evaluation-harness model class.

`Scorer.loglikelihoods` answers lm-eval's `loglikelihood` request: for (context, continuation)
token ids, the summed log-probability of the continuation's tokens, each given every token
before it, and whether greedy decoding would have produced the continuation. Requests are
sorted by length and run in batches of padded length buckets (a few compiled shapes, not one
per length) with the jitted forward pass, on a mesh: rows split over its data axes, parameters
as training places them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax import sharding
from gptjax.model import GPT, GPTConfig
from gptjax.tokenizer import Tokenizer

MIN_BUCKET = 16  # the shortest padded row length


def bucket_length(n: int, limit: int) -> int:
    """The padded length of a row of `n` tokens: the next power of two from MIN_BUCKET, at most `limit`."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, limit)


class Scorer:
    """A model's log-likelihoods of continuations, jitted, batched, on a mesh (or one device).

    params: the model's parameters, on the host, one device, or already placed on `mesh`.
    mesh None: a mesh of the default backend's first device. `batch_size` (rows per forward
    pass) is rounded up to a multiple of the mesh's data-parallel size.
    """

    def __init__(self, gpt: GPTConfig, params: Any, mesh: Mesh | None = None, batch_size: int = 32):
        self.gpt, self.model = gpt, GPT(gpt)
        self.mesh = mesh if mesh is not None else sharding.make_mesh({"data": 1}, jax.devices()[:1])
        dp = sharding.data_parallel_size(self.mesh)
        self.batch_size = -(-max(int(batch_size), 1) // dp) * dp
        self.row_sharding = sharding.batch_sharding(self.mesh, ndim=2)
        if mesh is None:
            params = jax.device_put(params, self.mesh.devices.flat[0])
        self.params = params
        rep = sharding.replicated(self.mesh)
        self._score = jax.jit(self._rows, out_shardings=(rep, rep))

    @classmethod
    def load(cls, path: str, batch_size: int = 32, mesh: Mesh | None = None) -> tuple["Scorer", Tokenizer]:
        """The Scorer of a workdir or checkpoint directory (read as `gptjax.sampling.api.load`
        reads it), and the run's tokenizer."""
        from gptjax.sampling.api import load

        loaded = load(path, mesh=mesh)
        return cls(loaded.model_config, loaded.params, mesh, batch_size), loaded.tokenizer

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def _rows(self, params: Any, inputs_BxT: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sum of the weighted targets' log-probabilities [B], whether each weighted target is the argmax [B])."""
        logits_BxTxV = self.model.apply({"params": params}, inputs_BxT, deterministic=True).astype(jnp.float32)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        target_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        greedy_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT) | (weights_BxT == 0)
        return (target_BxT * weights_BxT).sum(axis=1), greedy_BxT.all(axis=1)

    def _rows_of(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[list[int], int]]:
        """(tokens cut from the left to block_size + 1, continuation length) per request."""
        out = []
        for i, (context, continuation) in enumerate(requests):
            if not len(context) or not len(continuation):
                raise ValueError(f"request {i}: context and continuation must each hold at least one token "
                                 "(give [eot_id] as the context of a text with none)")
            tokens = [int(t) for t in (*context, *continuation)][-(self.gpt.block_size + 1):]
            out.append((tokens, min(len(continuation), len(tokens) - 1)))
        return out

    def _batches(self, rows: list[tuple[list[int], int]]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(request indices, padded batch) in order of decreasing length."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for b in range(0, len(order), self.batch_size):
            idx = np.array(order[b : b + self.batch_size])
            t = bucket_length(len(rows[idx[0]][0]) - 1, self.gpt.block_size)
            batch = {k: np.zeros((self.batch_size, t), np.int32) for k in ("inputs", "targets")}
            batch["weights"] = np.zeros((self.batch_size, t), np.float32)
            for r, i in enumerate(idx):
                tokens, n_cont = rows[i]
                n = len(tokens) - 1
                batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
                batch["weights"][r, n - n_cont : n] = 1.0
            yield idx, batch

    def _global(self, x: np.ndarray) -> jax.Array:
        """A batch array every host holds whole, split over the mesh's data axes."""
        return jax.make_array_from_callback(x.shape, self.row_sharding, lambda index: x[index])

    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                       progress: bool = False, params: Any = None) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum over the continuation's tokens of
        log p(token | every token before it), whether each of them is the most likely token):
        lm-eval's `loglikelihood`. The context must hold a token (lm-eval gives end-of-text for
        an empty one); context + continuation are cut from the left to block_size + 1 tokens.
        Every host of a pod passes the same requests and gets every result. `params`: other
        parameters of the same model, placed as the Scorer's (training's, as it goes on)."""
        rows = self._rows_of(requests)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        batches = self._batches(rows)
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            batches = tqdm(batches, total=-(-len(rows) // self.batch_size), unit="batch", desc="scoring")
        with self._context():
            for idx, batch in batches:
                logp, greedy = self._score(self.params if params is None else params, *(self._global(batch[k]) for k in ("inputs", "targets", "weights")))
                logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
                for r, i in enumerate(idx):
                    out[i] = (float(logp[r]), bool(greedy[r]))
        return out
