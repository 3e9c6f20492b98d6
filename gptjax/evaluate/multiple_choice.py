"""Multiple-choice accuracy on HellaSwag-format jsonl: one item a line, {"ctx": str,
"endings": [str, ...], "label": int}, the format HellaSwag's validation file is published in
(its other fields are ignored).

Scored as llm.c's dev/data/hellaswag.py scores it ("completion style"): each ending is
encoded as " " + ending after the encoded context (no end-of-text before the context), and
its log-likelihood summed over its tokens given everything before them.

    acc       the ending with the highest summed log-likelihood is the label
    acc_norm  the ending with the highest mean log-likelihood per token (llm.c's normalisation)

lm-evaluation-harness's `hellaswag` task differs: it cleans the text first (" [title]",
double spaces) and its acc_norm divides by the ending's length in characters; the numbers are
therefore not the harness's (OpenAI's GPT-2 124M: 29.55% acc_norm in llm.c, 31.14% in the harness).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from gptjax.errors import UserError
from gptjax.evaluate.scoring import Scorer
from gptjax.tokenizer import Tokenizer

GET_HELLASWAG = ("curl -L --create-dirs -o data/hellaswag_val.jsonl "
                 "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl")


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: the context, the candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


def _item(record: object, where: str) -> Item:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    if not isinstance(ctx, str):
        raise UserError(f"{where}: 'ctx' must be a string, got {ctx!r}")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of at least 2 strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise UserError(f"{where}: 'label' must be an index into endings (0..{len(endings) - 1}), got {label!r}")
    return Item(ctx, tuple(endings), label)


def read_items(path: str, limit: int = 0) -> list[Item]:
    """The items of a HellaSwag-format jsonl file (the first `limit`, 0: all); a bad line is a
    UserError naming the file and line, a missing file one saying where HellaSwag's is."""
    if not os.path.isfile(path):
        raise UserError(f"multiple-choice file {path!r} does not exist (HellaSwag's validation set: "
                        f"{GET_HELLASWAG}; or leave it out of eval.tasks)")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {n}: not valid JSON") from None
            items.append(_item(record, f"{path} line {n}"))
            if limit and len(items) >= limit:
                break
    if not items:
        raise UserError(f"multiple-choice file {path!r} holds no items")
    return items


def requests(items: Sequence[Item], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(context ids, ending ids) for every ending of every item, in order: the ending encoded
    with a leading space, as llm.c does; an empty context reads as end-of-text."""
    out = []
    for item in items:
        context = tokenizer.encode(item.context) or [tokenizer.eot_id]
        out += [(context, tokenizer.encode(" " + ending)) for ending in item.endings]
    return out


def accuracy(items: Sequence[Item], scored: Sequence[tuple[float, int]]) -> dict[str, float]:
    """acc and acc_norm from (summed log-likelihood, tokens) of every ending of every item, in
    `requests` order (ties go to the first ending, as llm.c's argmin does)."""
    correct = correct_norm = 0
    k = 0
    for item in items:
        logp = np.array([scored[k + j][0] for j in range(len(item.endings))])
        tokens = np.array([scored[k + j][1] for j in range(len(item.endings))], np.float64)
        k += len(item.endings)
        correct += int(np.argmax(logp) == item.label)
        correct_norm += int(np.argmax(logp / tokens) == item.label)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": float(len(items))}


class MultipleChoice:
    """A multiple-choice task, encoded once with a tokenizer and scored for any parameters."""

    def __init__(self, items: Sequence[Item], tokenizer: Tokenizer, block_size: int):
        self.items = list(items)
        self.requests = requests(self.items, tokenizer)
        # tokens scored per ending, after the cut to block_size + 1 tokens that Scorer makes
        self.lengths = [min(len(e), len(c) + len(e) - 1, block_size) for c, e in self.requests]

    def evaluate(self, scorer: Scorer, params: object = None, progress: bool = False) -> dict[str, float]:
        """acc, acc_norm and the number of items, for `params` (default: the scorer's)."""
        results = scorer.loglikelihoods(self.requests, progress=progress, params=params)
        return accuracy(self.items, [(logp, n) for (logp, _), n in zip(results, self.lengths)])
