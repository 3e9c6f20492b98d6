"""Whole documents scored as lm-evaluation-harness's `loglikelihood_rolling` scores them (its
wikitext-style perplexity tasks): each document on its own, in disjoint windows of the model's
context, the first conditioned on end-of-text alone, each later one on the tokens before it.

    rolling_bpb = -(sum of every document's log-likelihood) / ln 2 / UTF-8 bytes of the documents

is lm-eval's `bits_per_byte` for the same texts. Training's val_bpb (`gptjax.evaluate.bpb`) is
the same measure on other windows: fixed rows of seq_len cut from the validation stream.
"""

from __future__ import annotations

import math
from typing import Iterable

from gptjax.evaluate.scoring import Scorer
from gptjax.tokenizer import Tokenizer


def rolling_requests(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that predict every token of `tokens` once: lm-eval's
    `get_rolling_token_windows(tokens, prefix, max_len, context_len=1)` made disjoint
    (`make_disjoint_window`). The first window predicts tokens[:max_len] from `prefix`; each
    later one predicts up to max_len tokens with max_len tokens of context before its last."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    return [(context[: len(context) - (len(continuation) - 1)], continuation) for context, continuation in windows]


def rolling_metrics(scorer: Scorer, tokenizer: Tokenizer, texts: Iterable[str], progress: bool = False) -> dict[str, float]:
    """rolling_loss (nats per token), rolling_ppl, rolling_bpb, rolling_tokens, rolling_bytes
    and documents, over `texts` (a text that encodes to no tokens is left out)."""
    requests: list[tuple[list[int], list[int]]] = []
    n_tokens = n_bytes = documents = 0
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        requests += rolling_requests(ids, tokenizer.eot_id, scorer.gpt.block_size)
        n_tokens, n_bytes, documents = n_tokens + len(ids), n_bytes + len(text.encode("utf-8")), documents + 1
    if not documents:
        return {"documents": 0.0}
    nats = -sum(logp for logp, _ in scorer.loglikelihoods(requests, progress=progress))
    return {"rolling_loss": nats / n_tokens, "rolling_ppl": math.exp(min(nats / n_tokens, 50.0)),
            "rolling_bpb": nats / math.log(2) / n_bytes, "rolling_tokens": float(n_tokens),
            "rolling_bytes": float(n_bytes), "documents": float(documents)}
