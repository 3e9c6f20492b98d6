"""`python -m gptjax.eval`: what a run's model learned, on any text gptjax reads.

    python -m gptjax.eval --workdir runs/default                        # its own validation text
    python -m gptjax.eval --workdir runs/x/checkpoints/500 --source "files:data/wiki/*.txt"
    python -m gptjax.eval --workdir runs/gpt2_124m --hellaswag data/hellaswag_val.jsonl
    python -m gptjax.eval --workdir runs/default --source "files:wiki.test.txt" --rolling

For a data source (`--source`, in data.source's syntax; default: the run's own): validation
loss, perplexity and bits per byte of its validation documents (held out by name, as training
holds them out), in training's evaluation batches, so that the run's own source gives the
val_loss training logged; with `--rolling`, every document of the source scored whole, as
lm-eval's wikitext-style tasks score it (`gptjax.evaluate.rolling`). For a HellaSwag-format file (`--hellaswag`): acc and acc_norm as
llm.c computes them (`gptjax.evaluate.multiple_choice`). The model is placed on the run's
mesh (all devices, as training would use them); nothing of lm-eval is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Iterator

from gptjax import runtime
from gptjax.errors import UserError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptjax.eval", description="Evaluate a gptjax run.")
    p.add_argument("--workdir", required=True, help="a run directory, or one of its checkpoints/<step> directories")
    p.add_argument("--source", default=None,
                   help="data.source to score (default: the run's own, unless --hellaswag is given alone)")
    p.add_argument("--rolling", action="store_true",
                   help="score every document of the source whole, as lm-eval's loglikelihood_rolling does "
                        "(its train and validation documents alike: give held-out text)")
    p.add_argument("--hellaswag", default=None, help="a HellaSwag-format jsonl file (ctx, endings, label)")
    p.add_argument("--max_items", type=int, default=0, help="multiple choice: the first N items (0: all)")
    p.add_argument("--eval_batches", type=int, default=None,
                   help="batches of the run's micro-batch (default: the run's train.eval_batches; 0: all the validation text)")
    p.add_argument("--batch_size", type=int, default=32, help="multiple choice: rows per forward pass")
    args = p.parse_args(argv)
    if args.max_items < 0 or args.batch_size < 1 or (args.eval_batches is not None and args.eval_batches < 0):
        raise UserError("--max_items and --eval_batches must be >= 0 and --batch_size >= 1")
    return args


def _sections(path: str, source: str | None) -> tuple[Any, str]:
    """The run's saved config as sections (data.source replaced by `source`, no eval tasks), and
    its run directory."""
    from gptjax import config as config_lib
    from gptjax.checkpoint_read import read_run_config
    from gptjax.layout import find_run

    run_dir, _ = find_run(path)
    saved = read_run_config(run_dir)
    assert saved is not None  # find_run found its config.json
    config = config_lib.base_config()
    for name, section in saved.items():  # a run saved before a section existed takes its defaults
        if isinstance(section, config_lib.ConfigDict):
            config[name].update(section.to_dict())
        else:
            config[name] = section
    # The weights come from the run's checkpoint and its saved model section holds the whole
    # shape: an init_from directory (which may be gone) is not read again.
    config.init_from = ""
    config.eval.tasks = ""  # what to score is this command's own arguments, not the run's eval tasks
    s = config_lib.sections(config)
    if source is not None:
        s = dataclasses.replace(s, data=dataclasses.replace(s.data, source=source))
    return s, run_dir.root


def evaluate_run(path: str, source: str | None = None, hellaswag: str | None = None, max_items: int = 0,
                 eval_batches: int | None = None, batch_size: int = 32, rolling: bool = False) -> dict[str, float]:
    """The metrics of the run or checkpoint at `path`: val_loss, val_ppl, val_bpb (each per
    source of a mixture too) of `source` (default: the run's own; none when only `hellaswag`
    is given), or with `rolling` the rolling_* metrics of its documents scored whole
    (`gptjax.evaluate.rolling`); and acc, acc_norm, items of a HellaSwag-format file."""
    import jax

    from gptjax import sharding
    from gptjax.checkpoint_read import load_for_inference
    from gptjax.evaluate.bpb import ValidationSet
    from gptjax.evaluate.multiple_choice import MultipleChoice, read_items
    from gptjax.evaluate.rolling import rolling_metrics
    from gptjax.evaluate.scoring import Scorer
    from gptjax.prepare import prepare
    from gptjax.run import resolve

    s, root = _sections(path, source)
    sharding.arrange_cpu_devices(s.mesh)
    r = resolve(s, root)
    if r.devices_note:
        runtime.log(r.devices_note)
    score_text = source is not None or hellaswag is None
    r = prepare(r, data=score_text and not rolling)
    _, params = load_for_inference(path, device=jax.devices("cpu")[0])
    params = jax.device_put(params, r.steps.layout.params)
    out: dict[str, float] = {}
    scorer = Scorer(r.model, params, r.mesh, batch_size)
    if score_text and rolling:
        assert r.tokenizer is not None
        out.update(rolling_metrics(scorer, r.tokenizer, _documents(r.data), progress=sys.stderr.isatty()))
    elif score_text:
        assert r.dataset is not None
        t = r.train
        batches = eval_batches if eval_batches is not None else t.eval_batches
        if batches == 0:  # every row the validation text fills: at most one per token
            batches = math.ceil(r.dataset.val_tokens / t.micro_batch) + 1
        val = ValidationSet(r.dataset, t.micro_batch, t.seq_len, batches, jax.process_index(), jax.process_count())
        out.update(val.metrics(r.steps, params))
        out.update(val_tokens=sum(val.coverage.tokens), val_bytes=float(sum(val.coverage.bytes)))
    if hellaswag is not None:
        assert r.tokenizer is not None
        mc = MultipleChoice(read_items(hellaswag, max_items), r.tokenizer, r.model.block_size)
        out.update(mc.evaluate(scorer, progress=sys.stderr.isatty()))
    return out


def _documents(data: Any) -> Iterator[str]:
    """The text of every document of `data.source`, in order."""
    from gptjax.data import parse_source
    from gptjax.data.sources import resolve as resolve_source

    for spec in parse_source(data.source):
        for doc in resolve_source(spec, data).documents():
            yield "".join(text for text, _ in doc.segments)


def report(metrics: dict[str, float]) -> list[str]:
    """The lines `main` prints."""
    lines = []
    if "val_loss" in metrics:
        line = f"val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}"
        if "val_bpb" in metrics:
            line += f"  val_bpb {metrics['val_bpb']:.4f}"
        lines.append(line + f"  ({metrics['val_tokens']:,.0f} tokens, {metrics['val_bytes']:,.0f} bytes)")
        lines += [f"  {k[len('val_bpb/'):]}: val_loss {metrics['val_loss/' + k[len('val_bpb/'):]]:.4f}  val_bpb {v:.4f}"
                  for k, v in metrics.items() if k.startswith("val_bpb/")]
    if "rolling_bpb" in metrics:
        lines.append(f"rolling_loss {metrics['rolling_loss']:.4f}  rolling_ppl {metrics['rolling_ppl']:.2f}  "
                     f"rolling_bpb {metrics['rolling_bpb']:.4f}  ({metrics['documents']:.0f} documents, "
                     f"{metrics['rolling_tokens']:,.0f} tokens, {metrics['rolling_bytes']:,.0f} bytes)")
    if "acc" in metrics:
        lines.append(f"multiple choice: acc {metrics['acc']:.4f}  acc_norm {metrics['acc_norm']:.4f}  "
                     f"({metrics['items']:.0f} items)")
    return lines


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        runtime.cpu_unless_accelerated()  # before anything starts JAX's backends
        runtime.quiet_background_errors()
        metrics = evaluate_run(args.workdir, args.source, args.hellaswag, args.max_items, args.eval_batches,
                               args.batch_size, args.rolling)
        for line in report(metrics):
            print(line, flush=True)

    run_cli(body)
