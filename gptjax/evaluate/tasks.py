"""Evaluation during training (`prepare_evaluation`): the run's validation set and the `eval`
config section's tasks, prepared once when the loop starts and evaluated for the train state's
parameters on the run's mesh. The tasks:

    hellaswag:PATH   multiple choice (`gptjax.evaluate.multiple_choice`):
                     eval/<file stem>/acc, eval/<file stem>/acc_norm
    bpb:SOURCE       a data source's validation text, tokenized into the run's data cache with
                     the run's tokenizer (`gptjax.evaluate.bpb`): eval/<source>/loss, .../bpb

The prepare stage (`gptjax.prepare`) reads each task's input with the run's data (a
multiple-choice file's items, a bpb source's token cache), so that a bad file is refused
before any work. Every task scores fixed inputs with the parameters alone, so a resumed run
reports the same values as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from gptjax.evaluate.bpb import ValidationSet, source_labels
from gptjax.evaluate.multiple_choice import MultipleChoice
from gptjax.evaluate.scoring import Scorer
from gptjax.run import Run


def _labels(tasks: list[tuple[str, str]]) -> list[str]:
    """A short, unique label per task: a file's stem, a source's short name."""
    labels = [os.path.splitext(os.path.basename(arg))[0] if kind == "hellaswag" else source_labels([arg])[0]
              for kind, arg in tasks]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


class Benchmarks:
    """The run's eval tasks, prepared from the inputs the prepare stage read (items encoded, the
    bpb sources' evaluation batches drawn): calling it with parameters gives every task's
    metrics, named `eval/<task label>/<metric>`."""

    def __init__(self, r: Run):
        assert r.tokenizer is not None
        e, t, specs = r.sections.eval, r.train, r.sections.eval.task_list()
        self.steps, self.labels = r.steps, _labels(specs)
        self.scorer = Scorer(r.model, None, r.mesh, e.batch_size)
        self.tasks: list[MultipleChoice | ValidationSet] = [
            MultipleChoice(given, r.tokenizer, r.model.block_size) if kind == "hellaswag" else
            ValidationSet(given, t.micro_batch, t.seq_len, e.bpb_batches or t.eval_batches, jax.process_index(),
                          jax.process_count())
            for (kind, _), given in zip(specs, r.eval_inputs)]

    def __call__(self, params: Any) -> dict[str, float]:
        out = {}
        for label, task in zip(self.labels, self.tasks):
            if isinstance(task, MultipleChoice):
                metrics = task.evaluate(self.scorer, params)
            else:
                metrics = task.loss_and_bpb(self.steps, params)
            out.update({f"eval/{label}/{k}": v for k, v in metrics.items()})
        return out


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What the training loop evaluates, prepared once: the run's validation set, and the eval
    section's tasks (None without any)."""

    validation: ValidationSet
    benchmarks: Benchmarks | None


def prepare_evaluation(r: Run) -> Evaluation:
    """The run's validation set (its data's held-out batches, one micro-batch each) and its
    benchmark tasks, for the loop's evaluation steps."""
    assert r.dataset is not None
    t = r.train
    benchmarks = Benchmarks(r) if r.eval_inputs else None
    validation = ValidationSet(r.dataset, t.micro_batch, t.seq_len, t.eval_batches, jax.process_index(),
                               jax.process_count())
    return Evaluation(validation, benchmarks)


def benchmark_line(step: int, metrics: dict[str, float]) -> str:
    """'step 200: hellaswag_val acc 0.2900 acc_norm 0.2950 | files:wiki.txt loss 3.1000 bpb 1.1000'"""
    tasks: dict[str, list[str]] = {}
    for key, value in metrics.items():
        label, _, name = key.removeprefix("eval/").rpartition("/")
        if name != "items":
            tasks.setdefault(label, []).append(f"{name} {value:.4f}")
    return f"step {step}: " + " | ".join(f"{label} {' '.join(parts)}" for label, parts in tasks.items())
