"""Supervised fine-tuning, gptjax against transformers' Trainer, and packed against one example per row.

    python tools/compare_trainer.py                        # a tiny GPT-2 built here, made-up pairs
    python tools/compare_trainer.py --hf_dir ./gpt2 --steps 100 --seq_len 128

1. The same GPT-2 (a tiny random one built locally, as the tests build it, or --hf_dir) is
   fine-tuned on the same prompt/completion pairs by transformers' `Trainer` (labels -100 on
   prompt tokens and padding, one example per row, right-padded) and by gptjax with
   data.packing=False, with the same examples in the same order (the rows gptjax draws for each
   step are handed to the Trainer in that order), learning rate schedule (gptjax's, as a torch
   LambdaLR), AdamW settings, gradient clipping, batch and steps; no dropout, fp32. The
   completion loss of each step (the Trainer's logged loss; gptjax's step loss) must agree.
2. gptjax with data.packing=True on the same pairs and schedule: the step at which its
   validation completion loss first reaches the unpacked run's final one, and examples per
   second of both: examples per step over the median step time, the two kinds of batch timed
   interleaved on the same compiled step after a warm-up.

Figures are printed; nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gptjax import config as config_lib  # noqa: E402
from gptjax.errors import run_cli  # noqa: E402
from gptjax.prepare import prepare  # noqa: E402
from gptjax.run import resolve  # noqa: E402

CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Perth", "Dakar", "Quito", "Hanoi"]
ORGS = ["the central bank", "the city council", "the football club", "the ministry of health", "a local startup",
        "the university", "the port authority", "the weather service"]
THINGS = ["record rainfall", "a new stadium", "higher interest rates", "a vaccine campaign", "the bridge repairs",
          "a quarterly profit", "the night train", "a science prize", "a longer summer", "cheaper bread"]
FILLER = ["Please answer briefly.", "A reader asks:", "Quick one.", "From the news desk:", "Today's question:"]


def make_pairs(path: str, n: int, seed: int = 0) -> str:
    """n prompt/completion records whose completion follows from the prompt (a learnable map),
    of varied lengths (a filler of 0-3 sentences before the question)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            c, o = rng.randrange(len(CITIES)), rng.randrange(len(ORGS))
            filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 2)))
            prompt = f"{filler} What did {ORGS[o]} of {CITIES[c]} announce?".strip()
            f.write(json.dumps({"prompt": prompt, "completion": f" {THINGS[(3 * c + o) % len(THINGS)]}."}) + "\n")
    return path


def gptjax_config(hf_dir: str, pairs: str, *, steps: int, batch_size: int, seq_len: int, lr: float,
                  warmup: int, packing: bool, seed: int = 0) -> config_lib.ConfigDict:
    """The fine-tuning run: fp32, no dropout, AdamW with decay on the blocks' kernels, clipping at 1."""
    c = config_lib.base_config()
    c.seed = seed
    c.init_from = f"hf:{hf_dir}"
    c.data.source = f"pairs:{pairs}"
    c.data.val_fraction = 0.1
    c.data.packing = packing
    c.model.update(dropout=0.0, dtype="float32")
    c.train.update(steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=1)
    c.optim.update(lr=lr, warmup_steps=warmup, schedule="cosine", min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.01, grad_clip=1.0)
    return c


@dataclasses.dataclass
class GptjaxRun:
    losses: list[float]  # the step loss (completion tokens only) of steps 1..n
    step_s: list[float]  # wall time of each step
    batch_s: list[float]  # wall time of drawing each step's batch
    examples: list[int]  # examples in each step's batch
    val: dict[int, float]  # validation completion loss after the step
    batches: list[dict[str, np.ndarray]]  # the batches, for the Trainer
    jitted: Any = None  # gptjax's jitted steps (gptjax.step.Steps) and its final state
    state: Any = None


def run_gptjax(config: config_lib.ConfigDict, workdir: str, eval_every: int = 0,
               stop_below: float | None = None) -> GptjaxRun:
    """Train with gptjax's trainer on one device; evaluate every `eval_every` steps (0: at the end
    only); with `stop_below`, stop at the first evaluation at or below it."""
    r = prepare(resolve(config, workdir, devices=jax.devices()[:1]))
    t, steps, dataset = r.train, r.steps, r.dataset
    state = steps.state_from_params(r.pretrained)
    val_batches = dataset.eval_batches(t.batch_size, t.seq_len, max_batches=10**6)
    out = GptjaxRun([], [], [], [], {}, [])
    for step in range(t.steps):
        start = time.perf_counter()
        batch = dataset.get_batch(step, t.batch_size, t.seq_len, r.seed)
        out.batch_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        state, metrics = steps.train_step(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        out.step_s.append(time.perf_counter() - start)
        out.losses.append(loss)
        out.examples.append(count_examples(batch))
        out.batches.append(batch)
        done = step + 1
        if (eval_every and done % eval_every == 0) or done == t.steps:
            out.val[done] = steps.evaluate(state.params, val_batches)
            if stop_below is not None and out.val[done] <= stop_below:
                break
    out.jitted, out.state = steps, state
    return out


def time_steps(run: GptjaxRun, batch_sets: list[list[dict[str, np.ndarray]]], repeats: int) -> list[float]:
    """Median seconds of a train step on each set of batches, the sets interleaved step by step
    (the same compiled step, after a warm-up) so that a noisy machine slows them alike."""
    times: list[list[float]] = [[] for _ in batch_sets]
    state = run.state
    for i in range(repeats + 1):
        for k, batches in enumerate(batch_sets):
            start = time.perf_counter()
            state, metrics = run.jitted.train_step(state, batches[i % len(batches)])
            jax.block_until_ready(metrics)
            if i:
                times[k].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def count_examples(batch: dict[str, np.ndarray]) -> int:
    """Examples in a batch: the segments that have a trained token."""
    seg, w = batch["segment_ids"], batch["weights"]
    return int(sum(len(np.unique(seg[r][(w[r] > 0) & (seg[r] > 0)])) for r in range(len(seg))))


def trainer_rows(batch: dict[str, np.ndarray], pad_id: int) -> list[dict[str, list[int]]]:
    """The Trainer's rows for an unpacked gptjax batch: input_ids (the example, right-padded to
    seq_len + 1), attention_mask, and labels (-100 where gptjax's target weight is 0)."""
    rows = []
    width = batch["inputs"].shape[1] + 1
    for inputs, targets, weights, seg in zip(batch["inputs"], batch["targets"], batch["weights"], batch["segment_ids"]):
        if seg.max() > 1:
            raise ValueError("trainer_rows needs one example per row (data.packing=False)")
        n = int((seg > 0).sum())
        ids = [*inputs[:n].tolist(), int(targets[n - 1])]
        labels = [-100] + [t if w > 0 else -100 for t, w in zip(ids[1:], weights[:n].tolist())]
        pad = width - len(ids)
        rows.append({"input_ids": ids + [pad_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                     "labels": labels + [-100] * pad})
    return rows


def run_trainer(hf_dir: str, batches: list[dict[str, np.ndarray]], config: config_lib.ConfigDict,
                workdir: str) -> list[float]:
    """The logged loss of each step of transformers' Trainer on the given batches in order, with
    gptjax's schedule and AdamW settings."""
    import torch
    import transformers

    r = resolve(config, None, devices=jax.devices()[:1])
    o = r.optimizer.config
    model = transformers.GPT2LMHeadModel.from_pretrained(
        hf_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, torch_dtype=torch.float32)
    pad_id = model.config.eos_token_id
    width = batches[0]["inputs"].shape[1] + 1
    if width > model.config.n_positions:
        raise SystemExit(f"error: the Trainer's rows hold seq_len + 1 = {width} tokens (the last one only as a "
                         f"label), more than the model's {model.config.n_positions} positions; use a shorter --seq_len")
    rows = [row for b in batches for row in trainer_rows(b, pad_id)]
    data = [{k: torch.tensor(v) for k, v in row.items()} for row in rows]
    # gptjax decays the blocks' kernels only (optim.no_decay: biases, LayerNorms, embeddings).
    decay = [p for n, p in model.named_parameters() if ".h." in n and n.endswith(".weight") and ".ln_" not in n]
    rest = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: r.optimizer.lr_at(s) / o.lr)
    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=len(batches[0]["inputs"]), max_steps=len(batches),
        logging_steps=1, save_strategy="no", report_to=[], max_grad_norm=o.grad_clip, use_cpu=True,
        dataloader_drop_last=True, disable_tqdm=True, seed=config.seed)
    trainer = InOrder(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return [losses[s] for s in range(1, len(batches) + 1)]


def compare(hf_dir: str, pairs: str, workdir: str, *, steps: int, batch_size: int, seq_len: int, lr: float,
            warmup: int, eval_every: int, packed: bool = True, timing_repeats: int = 20) -> dict:
    """Run the comparison; return its figures (see the module docstring)."""
    kw = dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup)
    unpacked = run_gptjax(gptjax_config(hf_dir, pairs, packing=False, **kw), os.path.join(workdir, "unpacked"),
                          eval_every)
    ref_losses = run_trainer(hf_dir, unpacked.batches, gptjax_config(hf_dir, pairs, packing=False, **kw),
                                        os.path.join(workdir, "trainer"))
    rel = [abs(a - b) / abs(b) for a, b in zip(unpacked.losses, ref_losses)]
    out = {"steps": steps, "gptjax_losses": unpacked.losses, "trainer_losses": ref_losses, "rel_diff": rel,
           "unpacked_val": unpacked.val, "unpacked_examples_per_step": float(np.median(unpacked.examples)),
           "unpacked_step_s": float(np.median(unpacked.step_s[2:] or unpacked.step_s)),
           "unpacked_batch_s": float(np.median(unpacked.batch_s))}
    if packed:
        target = unpacked.val[steps]
        p = run_gptjax(gptjax_config(hf_dir, pairs, packing=True, **kw), os.path.join(workdir, "packed"),
                       eval_every, stop_below=target)
        reached = [s for s, v in sorted(p.val.items()) if v <= target]
        unpacked_s, packed_s = time_steps(p, [unpacked.batches, p.batches], repeats=timing_repeats)
        out.update(target_val=target, packed_val=p.val, packed_reached_at=reached[0] if reached else None,
                   packed_examples_per_step=float(np.median(p.examples)), unpacked_step_s=unpacked_s,
                   packed_step_s=packed_s, packed_batch_s=float(np.median(p.batch_s)))
    return out


def report(fig: dict, first: int) -> str:
    lines = ["step   Trainer loss   gptjax loss   relative difference"]
    for s, (a, b, d) in enumerate(zip(fig["trainer_losses"], fig["gptjax_losses"], fig["rel_diff"]), 1):
        if s <= first or s == fig["steps"]:
            lines.append(f"{s:4d}   {a:12.6f}   {b:11.6f}   {d:.1e}")
    lines.append(f"max relative difference: steps 1-{first} {max(fig['rel_diff'][:first]):.1e}, "
                 f"all {fig['steps']} steps {max(fig['rel_diff']):.1e}")
    u_s = fig["unpacked_batch_s"] + fig["unpacked_step_s"]
    ex_u = fig["unpacked_examples_per_step"] / u_s
    lines.append(f"one example per row: {fig['unpacked_examples_per_step']:.0f} examples/step, median batch + step "
                 f"{fig['unpacked_batch_s'] * 1e3:.1f} + {fig['unpacked_step_s'] * 1e3:.1f} ms; validation completion "
                 f"loss {fig['unpacked_val'][fig['steps']]:.4f} after {fig['steps']} steps")
    if "packed_step_s" in fig:
        p_s = fig["packed_batch_s"] + fig["packed_step_s"]
        ex_p = fig["packed_examples_per_step"] / p_s
        at = fig["packed_reached_at"]
        reached = f"at step {at} ({fig['packed_val'][at]:.4f})" if at is not None else f"not within {fig['steps']} steps"
        lines.append(f"packed: median {fig['packed_examples_per_step']:.0f} examples/step, median batch + step "
                     f"{fig['packed_batch_s'] * 1e3:.1f} + {fig['packed_step_s'] * 1e3:.1f} ms; reaches that "
                     f"validation loss {reached}")
        lines.append(f"examples/s: one per row {ex_u:,.0f}, packed {ex_p:,.0f} ({ex_p / ex_u:.1f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf_dir", default="",
                   help="a Hugging Face GPT-2 directory (default: a tiny random one with 256 positions, built here)")
    p.add_argument("--pairs", default="", help="a .jsonl of {prompt, completion} (default: made-up pairs)")
    p.add_argument("--examples", type=int, default=3000, help="made-up pairs to write")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--first", type=int, default=10, help="steps listed one by one")
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()

    def body() -> dict:
        with tempfile.TemporaryDirectory(prefix="compare_trainer-") as tmp:
            hf_dir = args.hf_dir
            if not hf_dir:
                sys.path.insert(0, os.path.join(ROOT, "tests"))
                from hf_fixtures import build_hf_dir

                hf_dir = build_hf_dir(os.path.join(tmp, "gpt2-tiny"), n_positions=256)
            pairs = args.pairs or make_pairs(os.path.join(tmp, "pairs.jsonl"), args.examples)
            return compare(hf_dir, pairs, tmp, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, warmup=args.warmup, eval_every=args.eval_every)

    fig = run_cli(body)  # a setting gptjax refuses (e.g. --warmup past --steps): one line, exit 2
    print(report(fig, min(args.first, args.steps)))


if __name__ == "__main__":
    main()
