"""Validation metrics: val_loss and val_ppl of held-out batches (each source of a mixture too),
their log line, and bits per byte, the validation loss in units that do not depend on the
tokenizer:

    bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the text scored

The bytes are counted from the evaluation batches themselves (`scored_text`), so they are the
bytes of exactly the tokens the loss sums over: each run of consecutive scored target tokens
(weight > 0) is decoded with the run's tokenizer and its UTF-8 bytes counted. A run ends at an
end-of-text token, at an unscored token (a prompt token, padding) and where the source
changes; consecutive windows of a plain-text source continue one run (they are contiguous in
its validation stream). End-of-text targets count in the loss, as in val_loss, but spell no
text: they add no bytes. Decoding whole runs rather than single tokens gets the bytes of the
text right where tokens are not whole characters (byte-level BPE, SentencePiece's byte
fallback) and drops SentencePiece's leading space at the start of a document.

Since the tokens and bytes are fixed for a validation set, val_bpb = val_loss * tokens /
bytes / ln 2: val_loss is computed as before and only gains a companion.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from gptjax.tokenizer import Tokenizer


def source_labels(sources: list[str]) -> list[str]:
    """Short names of a mixture's sources for metrics ('pairs:qa.jsonl' for 'pairs:data/qa.jsonl'),
    the full names where the short ones would collide."""
    short = [s.split(":", 1)[0] + ":" + os.path.basename(s.split(":", 1)[1].rstrip("/")) if ":" in s else s
             for s in sources]
    return short if len(set(short)) == len(short) else list(sources)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def eval_metrics(val_loss: float, source_losses: list[float | None] | None, sources: list[str]) -> dict[str, float]:
    """val_loss and val_ppl, and for each source of a mixture `val_loss/<source>` and `val_ppl/<source>`
    (a source's loss counts what it trains on: a pairs: source's completions)."""
    out = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
    if source_losses is not None and len(sources) > 1:
        for label, loss in zip(source_labels(sources), source_losses):
            if loss is not None:
                out[f"val_loss/{label}"], out[f"val_ppl/{label}"] = loss, perplexity(loss)
    return out


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """'step 200: val_loss 2.1234  val_ppl 8.37  val_bpb 1.0512 | files:news.jsonl 2.5012 (ppl 12.20), ...'
    (val_bpb where the metrics have it)."""
    line = f"step {step}: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}"
    if "val_bpb" in metrics:
        line += f"  val_bpb {metrics['val_bpb']:.4f}"
    per_source = [f"{k[len('val_loss/'):]} {v:.4f} (ppl {metrics['val_ppl/' + k[len('val_loss/'):]]:.2f})"
                  for k, v in metrics.items() if k.startswith("val_loss/")]
    return line + (" | " + ", ".join(per_source) if per_source else "")



@dataclasses.dataclass(frozen=True)
class Coverage:
    """What evaluation batches score: target tokens (the weight sum) and UTF-8 bytes, per source."""

    tokens: tuple[float, ...]
    bytes: tuple[int, ...]

    def bits_per_byte(self, mean_loss: float, source: int | None = None) -> float | None:
        """Bits per byte of a mean token loss over all sources (or one); None without bytes."""
        tokens = sum(self.tokens) if source is None else self.tokens[source]
        n_bytes = sum(self.bytes) if source is None else self.bytes[source]
        return mean_loss * tokens / (n_bytes * math.log(2)) if n_bytes > 0 else None


def _row_sources(batch: dict[str, np.ndarray], n_sources: int) -> np.ndarray:
    """The source of each row: -1 for a padding row (no weight)."""
    rows = len(batch["targets"])
    if "sources" in batch:
        s = batch["sources"]
        return np.where(s.sum(axis=1) > 0, s.argmax(axis=1), -1)
    return np.where(batch["weights"].sum(axis=1) > 0, 0, -1) if n_sources == 1 else np.full(rows, -1)


def scored_text(batches: Iterable[dict[str, np.ndarray]], tokenizer: Tokenizer, n_sources: int = 1) -> Coverage:
    """The tokens and UTF-8 bytes that `batches` (all rows of the global batches, in order)
    score, per source: see the module docstring for how runs of tokens are decoded."""
    tokens, n_bytes = np.zeros(n_sources), np.zeros(n_sources, np.int64)
    run: list[int] = []
    run_source = -1

    def flush() -> None:
        if run:
            n_bytes[run_source] += len(tokenizer.decode(run).encode("utf-8"))
            run.clear()

    eot = tokenizer.eot_id
    for batch in batches:
        for source, targets, weights in zip(_row_sources(batch, n_sources), batch["targets"], batch["weights"]):
            if source != run_source:
                flush()
                run_source = source
            if source < 0:
                continue
            tokens[source] += float(weights.sum())
            start = 0
            for end in np.flatnonzero((weights <= 0) | (targets == eot)).tolist():  # where runs end
                run.extend(targets[start:end].tolist())
                flush()
                start = end + 1
            run.extend(targets[start:].tolist())
    flush()
    return Coverage(tuple(float(t) for t in tokens), tuple(int(b) for b in n_bytes))


def bpb_metrics(metrics: dict[str, float], coverage: Coverage, sources: Sequence[str]) -> dict[str, float]:
    """val_bpb, and `val_bpb/<source>` for each source of a mixture, from `eval_metrics`' losses."""
    out: dict[str, float] = {}
    total = coverage.bits_per_byte(metrics["val_loss"])
    if total is not None:
        out["val_bpb"] = total
    if len(sources) > 1:
        for i, label in enumerate(source_labels(list(sources))):
            loss = metrics.get(f"val_loss/{label}")
            bpb = None if loss is None else coverage.bits_per_byte(loss, i)
            if bpb is not None:
                out[f"val_bpb/{label}"] = bpb
    return out


class ValidationSet:
    """A dataset's fixed evaluation batches (this host's rows) and what they score in bytes:
    val_loss, val_ppl and val_bpb of parameters, in total and per source."""

    def __init__(self, dataset: Any, batch_size: int, seq_len: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1):
        self.sources = list(dataset.sources)
        self.batches = dataset.eval_batches(batch_size, seq_len, max_batches, process_index, process_count)
        every_row = self.batches if process_count == 1 else dataset.eval_batches(batch_size, seq_len, max_batches)
        self.coverage = scored_text(every_row, dataset.tokenizer, len(self.sources))

    def metrics(self, steps: Any, params: Any) -> dict[str, float]:
        """val_loss, val_ppl, val_bpb (each per source too, for a mixture) of `params`."""
        ev = eval_metrics(*steps.evaluate_sources(params, self.batches), self.sources)
        ev.update(bpb_metrics(ev, self.coverage, self.sources))
        return ev

    def loss_and_bpb(self, steps: Any, params: Any) -> dict[str, float]:
        """loss and bpb (where the text has bytes) of `params` over all sources: a benchmark's metrics."""
        ev = self.metrics(steps, params)
        return {"loss": ev["val_loss"], **({"bpb": ev["val_bpb"]} if "val_bpb" in ev else {})}
