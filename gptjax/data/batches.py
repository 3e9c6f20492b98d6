"""The batch sampler: deterministic training batches and a fixed validation set from token streams.

Rows of a plain-text source are random windows of its training stream. Rows of a supervised
source (`pairs:`, a stream with a loss mask) hold whole examples (prompt, completion,
end-of-text), several packed into a row (`data.packing`) or one per row, padded: no row starts
inside an example, and each token carries its example's segment id (1, 2, ... in the row; 0
for padding) and its position within the example, so that the model attends only within an
example. Everything drawn depends only on (seed, step): a resumed run draws the same batches,
and each host assembles only its own rows.

Shape letters: B rows of the global batch, R this host's rows, L seq_len, W = L + 1 (a window
holds the inputs and, shifted by one, the targets), K examples a packed row may look at, S sources.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import numpy as np

from gptjax.data.cache import TokenStream
from gptjax.schema import LONG_EXAMPLES
from gptjax.errors import UserError
from gptjax.tokenizer import Tokenizer

PAD_ID = 0  # the token id of padding: weight 0, segment 0
_EXAMPLE_STREAM = 1  # the generator (seed, step, _EXAMPLE_STREAM) draws examples; (seed, step) draws windows
_MAX_LOOKAHEAD = 4096


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


def document_segments(inputs_RxL: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and positions of windows split at end-of-text: an end-of-text input starts
    the next document (it predicts that document's first token), whose positions restart at 0."""
    segments_RxL = (1 + np.cumsum(inputs_RxL == eot_id, axis=1)).astype(np.int32)
    index_RxL = np.broadcast_to(np.arange(inputs_RxL.shape[1]), inputs_RxL.shape)
    starts_RxL = np.where(inputs_RxL == eot_id, index_RxL, 0)
    return segments_RxL, (index_RxL - np.maximum.accumulate(starts_RxL, axis=1)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Examples:
    """The examples of a supervised stream that fit a row, as slices of the stream.

    An example is its prompt, completion and end-of-text; in a row it takes length - 1 slots
    (inputs are its tokens but the last, targets its tokens but the first)."""

    starts: np.ndarray  # int64 [N]: where each example begins in the stream (after a cut prompt)
    lengths: np.ndarray  # int64 [N]: its tokens
    total: int  # examples in the stream
    too_long: int  # examples longer than a row (seq_len + 1 tokens)
    dropped: int  # of those, the ones left out

    @property
    def slots(self) -> np.ndarray:
        return self.lengths - 1

    @functools.cached_property
    def slot_list(self) -> list[int]:
        return self.slots.tolist()


def find_examples(stream: TokenStream, eot_id: int, seq_len: int, long_examples: str) -> Examples:
    """The examples of a supervised stream (each ends with end-of-text) for rows of seq_len.

    An example longer than seq_len + 1 tokens is, with long_examples='truncate', cut from the
    left of its prompt, keeping at least one prompt token (so the first completion token is still
    predicted); one whose completion alone is too long, or any with 'drop', is left out."""
    if stream.mask is None:
        raise ValueError("find_examples needs a stream with a loss mask")
    if long_examples not in LONG_EXAMPLES:
        raise UserError(f"data.long_examples must be one of {list(LONG_EXAMPLES)}, got {long_examples!r}")
    tokens = stream.tokens
    ends = np.flatnonzero(tokens == eot_id) + 1
    if not len(ends) or ends[-1] != len(tokens):  # a stream cut inside its only document ends without one
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lengths = (ends - starts).astype(np.int64)
    prompts = lengths - np.add.reduceat(stream.mask, starts, dtype=np.int64)  # a prompt is the untrained head
    useful = lengths >= 2
    over = np.maximum(lengths - 1 - seq_len, 0)
    too_long = useful & (over > 0)
    keep = useful & ((over == 0) | ((long_examples == "truncate") & (over < prompts)))
    return Examples(starts[keep] + over[keep], lengths[keep] - over[keep], int(useful.sum()),
                    int(too_long.sum()), int((too_long & ~keep).sum()))


def pack_first_fit(slots: list[int], candidates_RxK: np.ndarray, seq_len: int) -> list[list[int]]:
    """Rows of examples: each row takes, in order, those of its candidates that still fit."""
    rows = []
    for candidates in candidates_RxK.tolist():
        space, row = seq_len, []
        for e in candidates:
            if slots[e] <= space:
                row.append(e)
                space -= slots[e]
        rows.append(row)
    return rows


def pack_in_order(slots: list[int], seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of consecutive examples (next fit), or one example per row without packing."""
    rows: list[list[int]] = []
    space = 0
    for e, n in enumerate(slots):
        if not rows or not packing or n > space:
            rows.append([])
            space = seq_len
        rows[-1].append(e)
        space -= n
    return rows


def _lookahead(ex: Examples, seq_len: int, packing: bool) -> int:
    """How many drawn examples a packed row looks at: about twice what fills it, on average."""
    if not packing:
        return 1
    return int(min(_MAX_LOOKAHEAD, 2 * math.ceil(seq_len / max(float(ex.slots.mean()), 1.0)) + 4))


class _Rows:
    """The arrays of R rows being assembled: all padding to start with."""

    def __init__(self, r: int, seq_len: int):
        self.inputs = np.full((r, seq_len), PAD_ID, np.int32)
        self.targets = np.full((r, seq_len), PAD_ID, np.int32)
        self.weights = np.zeros((r, seq_len), np.float32)
        self.segments = np.zeros((r, seq_len), np.int32)
        self.positions = np.zeros((r, seq_len), np.int32)

    def windows(self, rows: np.ndarray, tokens_RxW: np.ndarray, mask_RxW: np.ndarray | None,
                eot_id: int | None) -> None:
        """Plain-text windows: one segment, or (eot_id) one per document."""
        b = _batch(tokens_RxW, np.ones_like(tokens_RxW, np.uint8) if mask_RxW is None else mask_RxW)
        self.inputs[rows], self.targets[rows], self.weights[rows] = b["inputs"], b["targets"], b["weights"]
        if eot_id is None:
            self.segments[rows], self.positions[rows] = 1, np.arange(self.inputs.shape[1], dtype=np.int32)
        else:
            self.segments[rows], self.positions[rows] = document_segments(b["inputs"], eot_id)

    def examples(self, rows: np.ndarray, stream: TokenStream, ex: Examples, packed: list[list[int]]) -> None:
        """Whole examples: row rows[i] holds the examples packed[i], one after another."""
        for r, row in zip(rows.tolist(), packed):
            o = 0
            for k, e in enumerate(row, 1):
                s, n = int(ex.starts[e]), int(ex.lengths[e])
                tokens, mask = stream.tokens[s : s + n], stream.mask[s : s + n]
                self.inputs[r, o : o + n - 1] = tokens[:-1]
                self.targets[r, o : o + n - 1] = tokens[1:]
                self.weights[r, o : o + n - 1] = mask[1:]
                self.segments[r, o : o + n - 1] = k
                self.positions[r, o : o + n - 1] = np.arange(n - 1)
                o += n - 1

    def batch(self, segmented: bool) -> dict[str, np.ndarray]:
        out = {"inputs": self.inputs, "targets": self.targets, "weights": self.weights}
        if segmented:
            out.update(segment_ids=self.segments, positions=self.positions)
        return out


class Dataset:
    """Token streams of weighted sources, and the deterministic batches drawn from them.

    packing: a supervised source's examples are packed into rows (else one per row, padded).
    long_examples: 'truncate' or 'drop' an example longer than a row (see `find_examples`).
    document_mask: plain-text rows carry segment ids and positions split at end-of-text.
    say: where the examples found in supervised sources are reported (once per seq_len).
    Batches carry `segment_ids` and `positions` when a source is supervised or document_mask is on.
    """

    def __init__(self, tokenizer: Tokenizer, sources: list[str], weights: list[float],
                 train: list[TokenStream], val: list[TokenStream], *, packing: bool = True,
                 long_examples: str = "truncate", document_mask: bool = False,
                 say: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.sources = sources
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.train, self.val = train, val
        self.packing, self.long_examples, self.document_mask = bool(packing), long_examples, bool(document_mask)
        self._say = say
        self._train_sizes = np.array([len(s.tokens) for s in train], np.int64)
        self._supervised = [s.mask is not None for s in train]
        self._examples: dict[int, list[tuple[Examples, Examples] | None]] = {}

    @property
    def train_tokens(self) -> int:
        return int(self._train_sizes.sum())

    @property
    def val_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.val)

    @property
    def segmented(self) -> bool:
        """Whether batches carry segment ids and positions."""
        return self.document_mask or any(self._supervised)

    def examples(self, seq_len: int) -> list[tuple[Examples, Examples] | None]:
        """(train, val) examples of each supervised source for rows of seq_len (None: plain text)."""
        if seq_len not in self._examples:
            eot = self.tokenizer.eot_id
            found = [(find_examples(t, eot, seq_len, self.long_examples), find_examples(v, eot, seq_len, self.long_examples))
                     if sup else None for t, v, sup in zip(self.train, self.val, self._supervised)]
            self._examples[seq_len] = found
            for name, ex in zip(self.sources, found):
                if ex is not None and self._say is not None:
                    self._say(_describe_examples(name, ex, seq_len, self.packing, self.long_examples))
        return self._examples[seq_len]

    def check(self, seq_len: int) -> None:
        """Raise UserError unless every training source can fill a row of seq_len and the
        validation data hold one."""
        if seq_len < 1:
            raise UserError(f"seq_len must be a positive integer, got {seq_len}")
        examples = self.examples(seq_len) if any(self._supervised) else [None] * len(self.sources)
        val_rows = False
        for name, n, ex, val in zip(self.sources, self._train_sizes, examples, self.val):
            if ex is None:
                if n < seq_len + 1:
                    raise UserError(f"{name}: the training text has {n} tokens, fewer than one window of seq_len+1="
                                    f"{seq_len + 1}; give more text or use a shorter seq_len")
                val_rows = val_rows or len(val.tokens) >= seq_len + 1
                continue
            if not len(ex[0].lengths):
                raise UserError(f"{name}: none of its {ex[0].total} training examples fits a row of seq_len+1="
                                f"{seq_len + 1} tokens (data.long_examples={self.long_examples!r}); "
                                "use a longer seq_len or shorter examples")
            val_rows = val_rows or len(ex[1].lengths) > 0
        if not val_rows:
            raise UserError(f"the validation text has {self.val_tokens} tokens, fewer than one window of seq_len+1="
                            f"{seq_len + 1}; raise data.val_fraction, give more text or use a shorter seq_len")

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's rows of the training batch for `step`: a function of (seed, step) only.

        Returns inputs and targets (int32 [rows, seq_len], targets = inputs shifted by one) and
        weights (float32, 0 where the target is not trained on: a prompt token, padding); with
        `segmented`, also segment_ids and positions (int32 [rows, seq_len]).
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
        # A supervised stream may be shorter than a window; its rows' starts are not used.
        starts_B = rng.integers(0, np.maximum(self._train_sizes[src_B] - seq_len, 1))
        src_R, starts_R = src_B[lo:hi], starts_B[lo:hi]
        if not self.segmented:
            tokens_RxW = np.empty((hi - lo, seq_len + 1), np.int32)
            mask_RxW = np.ones((hi - lo, seq_len + 1), np.uint8)
            for i in np.unique(src_R):
                rows = src_R == i
                tokens_RxW[rows], m = _gather(self.train[i], starts_R[rows], seq_len + 1)
                if m is not None:
                    mask_RxW[rows] = m
            return _batch(tokens_RxW, mask_RxW)
        out = _Rows(hi - lo, seq_len)
        examples = self.examples(seq_len)
        example_rng = np.random.default_rng([seed, step, _EXAMPLE_STREAM])
        for i in range(len(self.train)):
            rows_B = np.flatnonzero(src_B == i)
            ex = examples[i]
            if ex is None:
                rows_R = np.flatnonzero(src_R == i)
                if len(rows_R):
                    tokens_RxW, mask_RxW = _gather(self.train[i], starts_R[rows_R], seq_len + 1)
                    out.windows(rows_R, tokens_RxW, mask_RxW, self.tokenizer.eot_id if self.document_mask else None)
                continue
            train = ex[0]
            candidates_BxK = example_rng.integers(0, len(train.lengths), (len(rows_B), _lookahead(train, seq_len, self.packing)))
            mine = (rows_B >= lo) & (rows_B < hi)
            packed = pack_first_fit(train.slot_list, candidates_BxK[mine], seq_len)
            out.examples(rows_B[mine] - lo, self.train[i], train, packed)
        return out.batch(True)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int,
                     process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
        """A fixed validation set: for a plain-text source, consecutive non-overlapping windows
        from the start of its validation stream; for a supervised one, its validation examples in
        order (packed, or one per row); sources in proportion to their weights, at most
        `max_batches` batches.

        The last batch is padded with zero-weight rows, so every batch has the full shape. With
        more than one source each batch also has `sources`: float32 [rows, S], one-hot of the
        row's source (all 0 for padding), for the loss of each source.
        """
        lo, hi = _host_rows(batch_size, process_index, process_count)
        self.check(seq_len)
        examples = self.examples(seq_len) if any(self._supervised) else [None] * len(self.sources)
        total = max(0, int(max_batches)) * batch_size
        rows: list[tuple[int, int | list[int]]] = []  # (source, window start or the examples of the row)
        for i, (stream, w, ex) in enumerate(zip(self.val, self.weights, examples)):
            if ex is None:
                n = min((len(stream.tokens) - 1) // seq_len, math.ceil(w * total))
                rows += [(i, k * seq_len) for k in range(n)]
            else:
                rows += [(i, r) for r in pack_in_order(ex[1].slot_list, seq_len, self.packing)[: math.ceil(w * total)]]
        rows = rows[:total]
        rows += [(-1, 0)] * (-len(rows) % batch_size)  # padding rows: source -1, weight 0
        batches = []
        for b in range(0, len(rows), batch_size):
            chunk = rows[b + lo : b + hi]
            src_R = np.array([s for s, _ in chunk])
            if not self.segmented:
                tokens_RxW = np.zeros((hi - lo, seq_len + 1), np.int32)
                mask_RxW = np.zeros((hi - lo, seq_len + 1), np.uint8)
                starts_R = np.array([t for _, t in chunk], np.int64)
                for i in np.unique(src_R[src_R >= 0]):
                    sel = src_R == i
                    tokens_RxW[sel], m = _gather(self.val[i], starts_R[sel], seq_len + 1)
                    mask_RxW[sel] = 1 if m is None else m
                batch = _batch(tokens_RxW, mask_RxW)
            else:
                out = _Rows(hi - lo, seq_len)
                for i in np.unique(src_R[src_R >= 0]).tolist():
                    sel = np.flatnonzero(src_R == i)
                    if examples[i] is None:
                        starts_R = np.array([chunk[r][1] for r in sel], np.int64)
                        tokens_RxW, mask_RxW = _gather(self.val[i], starts_R, seq_len + 1)
                        out.windows(sel, tokens_RxW, mask_RxW, self.tokenizer.eot_id if self.document_mask else None)
                    else:
                        out.examples(sel, self.val[i], examples[i][1], [chunk[r][1] for r in sel])
                batch = out.batch(True)
            if len(self.sources) > 1:
                batch["sources"] = (src_R[:, None] == np.arange(len(self.sources))).astype(np.float32)
            batches.append(batch)
        return batches


def _describe_examples(name: str, ex: tuple[Examples, Examples], seq_len: int, packing: bool,
                       long_examples: str) -> str:
    """'pairs:qa.jsonl: 2,940 train / 60 val examples, mean 23 tokens, packed into rows of 128; ...'"""
    train, val = ex
    kept = np.concatenate([train.lengths, val.lengths])
    mean = f", mean {kept.mean():.0f} tokens" if len(kept) else ""
    line = (f"{name}: {len(train.lengths):,} train / {len(val.lengths):,} val examples{mean}, "
            f"{'packed into rows' if packing else 'one per row'} of seq_len={seq_len}")
    too_long, dropped = train.too_long + val.too_long, train.dropped + val.dropped
    if too_long:
        line += f"; {too_long:,} longer than seq_len+1={seq_len + 1} tokens"
        if too_long > dropped:
            line += f": {too_long - dropped:,} with the prompt cut from the left"
        if dropped:
            line += f", {dropped:,} left out" + (" (the completion alone is too long)" if long_examples == "truncate" else "")
        line += f" (data.long_examples={long_examples!r})"
    return line
