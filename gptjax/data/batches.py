"""The batch sampler: deterministic training batches and a fixed validation set from token streams.

Batch rows are random windows of the training streams whose positions depend only on
(seed, step): a resumed run draws the same batches, and each host draws only its own rows.

Shape letters: B rows of the global batch, R this host's rows, L seq_len, W = L + 1 (a window
holds the inputs and, shifted by one, the targets).
"""

from __future__ import annotations

import math

import numpy as np

from gptjax.data.cache import TokenStream
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer


def _host_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi): this host's rows of a global batch of `batch_size` rows."""
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"bad batch request: batch_size={batch_size}, process {process_index} of {process_count}")
    if batch_size % process_count:
        raise UserError(f"batch size {batch_size} must be divisible by the number of hosts ({process_count})")
    per_host = batch_size // process_count
    return process_index * per_host, (process_index + 1) * per_host


def _windows(x: np.ndarray, width: int) -> np.ndarray:
    """A read-only [len(x) - width + 1, width] view of every window of x (copies nothing)."""
    return np.lib.stride_tricks.as_strided(x, (len(x) - width + 1, width), x.strides * 2, writeable=False)


def _gather(stream: TokenStream, starts_R: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows stream[s : s + width] for each start s: tokens int32 [R, width], mask uint8 [R, width] or None."""
    tokens_RxW = _windows(stream.tokens, width)[starts_R].astype(np.int32)
    return tokens_RxW, None if stream.mask is None else _windows(stream.mask, width)[starts_R]


def _batch(tokens_RxW: np.ndarray, mask_RxW: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs, targets (int32 [R, L]) and weights (float32 [R, L]) of windows and their loss mask."""
    return {"inputs": np.ascontiguousarray(tokens_RxW[:, :-1]), "targets": np.ascontiguousarray(tokens_RxW[:, 1:]),
            "weights": mask_RxW[:, 1:].astype(np.float32)}


class Dataset:
    """Token streams of weighted sources, and the deterministic batches drawn from them."""

    def __init__(self, tokenizer: Tokenizer, sources: list[str], weights: list[float],
                 train: list[TokenStream], val: list[TokenStream]):
        self.tokenizer = tokenizer
        self.sources = sources
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.train, self.val = train, val
        self._train_sizes = np.array([len(s.tokens) for s in train], np.int64)

    @property
    def train_tokens(self) -> int:
        return int(self._train_sizes.sum())

    @property
    def val_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.val)

    def check(self, seq_len: int) -> None:
        """Raise UserError unless every training stream and the validation text hold a seq_len+1 window."""
        if seq_len < 1:
            raise UserError(f"seq_len must be a positive integer, got {seq_len}")
        for name, n in zip(self.sources, self._train_sizes):
            if n < seq_len + 1:
                raise UserError(f"{name}: the training text has {n} tokens, fewer than one window of seq_len+1="
                                f"{seq_len + 1}; give more text or use a shorter seq_len")
        if max(len(s.tokens) for s in self.val) < seq_len + 1:
            raise UserError(f"the validation text has {self.val_tokens} tokens, fewer than one window of seq_len+1="
                            f"{seq_len + 1}; raise data.val_fraction, give more text or use a shorter seq_len")

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of the training batch for `step`: a function of (seed, step) only.

        Returns inputs and targets (int32 [rows, seq_len], targets = inputs shifted by one) and
        weights (float32, 0 where the target is not trained on, e.g. a prompt token).
        """
        lo, hi = _host_rows(batch_size, process_index, process_count)
        self.check(seq_len)
        if seed < 0 or step < 0:
            raise UserError(f"seed and step must be >= 0, got seed={seed}, step={step}")
        rng = np.random.default_rng([seed, step])
        # Draw for all rows of the global batch, then keep this host's: hosts agree on the batch.
        if len(self.train) > 1:
            src_B = rng.choice(len(self.train), size=batch_size, p=self.weights)
        else:
            src_B = np.zeros(batch_size, np.int64)
        starts_B = rng.integers(0, self._train_sizes[src_B] - seq_len)
        src_R, starts_R = src_B[lo:hi], starts_B[lo:hi]
        tokens_RxW = np.empty((hi - lo, seq_len + 1), np.int32)
        mask_RxW = np.ones((hi - lo, seq_len + 1), np.uint8)
        for i in np.unique(src_R):
            rows = src_R == i
            tokens_RxW[rows], m = _gather(self.train[i], starts_R[rows], seq_len + 1)
            if m is not None:
                mask_RxW[rows] = m
        return _batch(tokens_RxW, mask_RxW)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
        """A fixed validation set: consecutive non-overlapping windows from the start of each source's
        validation stream (sources in proportion to their weights), at most `max_batches` batches.

        The last batch is padded with zero-weight rows, so every batch has the full shape.
        """
        lo, hi = _host_rows(batch_size, process_index, process_count)
        self.check(seq_len)
        total = max(0, int(max_batches)) * batch_size
        rows: list[tuple[int, int]] = []  # (source, start)
        for i, (stream, w) in enumerate(zip(self.val, self.weights)):
            n = min((len(stream.tokens) - 1) // seq_len, math.ceil(w * total))
            rows += [(i, k * seq_len) for k in range(n)]
        rows = rows[:total]
        rows += [(-1, 0)] * (-len(rows) % batch_size)  # padding rows: source -1, weight 0
        batches = []
        for b in range(0, len(rows), batch_size):
            chunk = rows[b + lo : b + hi]
            tokens_RxW = np.zeros((hi - lo, seq_len + 1), np.int32)
            mask_RxW = np.zeros((hi - lo, seq_len + 1), np.uint8)
            src_R = np.array([s for s, _ in chunk])
            starts_R = np.array([t for _, t in chunk], np.int64)
            for i in np.unique(src_R[src_R >= 0]):
                sel = src_R == i
                tokens_RxW[sel], m = _gather(self.val[i], starts_R[sel], seq_len + 1)
                mask_RxW[sel] = 1 if m is None else m
            batches.append(_batch(tokens_RxW, mask_RxW))
        return batches
