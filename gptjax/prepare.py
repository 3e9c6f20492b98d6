"""The prepare stage: `prepare(run)` does the work on disk that a resolved `Run` needs before
training. It creates the workdir, reads the `init_from` weights and tokenizer for a new run
and the eval tasks' multiple-choice files, and tokenizes the data: the run's own source and
the eval tasks' bpb sources, in one pass (training the tokenizer if the workdir has none).
The model does not change: its vocabulary size was known when the run was resolved.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from etils import epath

from gptjax import data as data_lib
from gptjax import hf
from gptjax.errors import UserError
from gptjax.evaluate.multiple_choice import read_items
from gptjax.failures import io_failure
from gptjax.run import Run


def prepare(r: Run, data: bool = True) -> Run:
    """`r` with its workdir created, init_from's weights and tokenizer read (a new run), and
    (`data`) the eval tasks' files read and the data tokenized: the run's own source and each
    bpb task's, in one pass. A UserError leaves no new workdir behind; a failed read or write
    is a one-line `RunFailed`.

    Process 0 creates the workdir (a URL needs nothing: objects make their prefixes) and
    removes it after a UserError if it created it."""
    if r.run_dir is None:
        raise ValueError("prepare needs a run resolved with a workdir")
    root = epath.Path(r.run_dir.root)
    leader = jax.process_index() == 0  # the other hosts of a pod only read the workdir here
    created = leader and not root.exists()
    tasks = r.sections.eval.task_list() if data else []
    try:
        if leader and not r.run_dir.is_url:
            os.makedirs(r.run_dir.root, exist_ok=True)
        pretrained, given = None, None
        if r.imported is not None and not r.resuming:
            pretrained, given = hf.load_init_from(r.imported, r.model)
        # Multiple-choice files are read here: a bad one is refused before any data is tokenized.
        items = [read_items(arg, r.sections.eval.max_items) if kind == "hellaswag" else None for kind, arg in tasks]
        tokenizer, datasets = given or r.tokenizer, []
        if data:
            sources = [r.data.source] + [arg for kind, arg in tasks if kind == "bpb"]
            datasets = data_lib.prepare_sources(r.data, r.sections.tokenizer, r.run_dir, sources, tokenizer=given)
            for dataset in datasets:
                dataset.check(r.train.seq_len)
            tokenizer = datasets[0].tokenizer
        # The tokenizer the data pass used fits the model that was resolved before it.
        if tokenizer is not None and tokenizer.vocab_size > r.model.vocab_size:
            raise UserError(f"the run's tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                            f"{r.model.vocab_size}; use a new workdir")
    except UserError:
        if created:
            root.rmtree(missing_ok=True)
        raise
    except OSError as e:  # a workdir that cannot be made, a full disk: one line
        raise io_failure("preparing the run", e, r.run_dir.root) from e
    bpb = iter(datasets[1:])
    eval_inputs = tuple(next(bpb) if read is None else read for read in items)
    return dataclasses.replace(r, tokenizer=tokenizer, dataset=datasets[0] if datasets else None,
                               eval_inputs=eval_inputs, pretrained=pretrained)
