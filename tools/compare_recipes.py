"""The GPT-2 recipe against the modern recipe: the steps and the time the modern one needs to
reach the GPT-2 recipe's final validation loss, on the same data, shape and tokens per step.

    python tools/compare_recipes.py                                   # the default corpus (stdlib source)
    python tools/compare_recipes.py --corpus input.txt                # a text file (tiny Shakespeare's size)
    python tools/compare_recipes.py --modern.optim.muon_lr=0.03       # an override of one recipe
    python tools/compare_recipes.py --config.train.steps=400          # an override of both

1. Both recipes (`--gpt2` configs/default.py and `--modern` configs/modern.py) are trained in
   turn, each in its own workdir under `--workdir`, on the same corpus (`--corpus`: a text
   file or glob, else the recipes' own source), with the same tokenizer (trained once, by the
   first run, and copied to the second) and token cache, the same held-out documents and
   evaluation batches, and validation every `--eval_every` steps. The recipes must agree on
   the model's width, depth, heads and context, the batch and the tokens per step (a check).
   A finished run in its workdir is reused, so tuning one recipe retrains only that one.
2. From each run's metrics.jsonl: the validation curve, and the training time at each
   evaluation (the logged tokens/s windows, which leave evaluation out). A window with
   compilation in it (the first, or the first after a resume: over 3x the median step time)
   counts at the median step time; the excess is shown apart as `compile s`.
3. The target is the GPT-2 recipe's final validation loss; the modern recipe reaches it at
   its first evaluation at or below it. Printed: a table of both runs and the ratios of steps
   and of training time against the GPT-2 recipe's whole run; `--png` gets the two curves
   (validation loss against steps and against training time) and summary.json the figures.

Timings need a quiet machine: the runs are sequential, so load that comes and goes between them
shows up in the time ratio (the step ratio does not depend on it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gptjax import config as config_lib  # noqa: E402
from gptjax.checkpoint_read import read_run_config  # noqa: E402
from gptjax.errors import UserError, run_cli  # noqa: E402
from gptjax import runtime, sharding  # noqa: E402
from gptjax.layout import RunDir  # noqa: E402

# Fields the two recipes must share for the comparison to mean anything (the model's vocabulary
# is the tokenizer's).
SAME = {
    "model": ("n_layer", "n_embd", "n_head", "block_size"),
    "train": ("batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches"),
    "data": ("source", "val_fraction", "document_mask", "packing"),
    "tokenizer": ("vocab_size", "model_type", "max_chars"),
}
TARGET_STEPS, TARGET_TIME = 0.5, 0.6  # the bar: at most half the steps, 60% of the time


def parse_overrides(extra: list[str]) -> dict[str, list[tuple[str, str]]]:
    """--config.FIELD=V (both recipes), --gpt2.FIELD=V and --modern.FIELD=V (one), as
    (dotted field, raw value) pairs for `gptjax.config.apply_overrides`."""
    out: dict[str, list[tuple[str, str]]] = {"config": [], "gpt2": [], "modern": []}
    i = 0
    while i < len(extra):
        arg = extra[i]
        name, eq, value = arg.partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise UserError(f"{arg} needs a value ({arg}=VALUE)")
            i, value = i + 1, extra[i + 1]
        prefix, _, field = name[2:].partition(".") if name.startswith("--") else ("", "", "")
        if prefix not in out or not field:
            raise UserError(f"unrecognised argument {arg!r}; overrides are --config.FIELD=V (both recipes), "
                            "--gpt2.FIELD=V or --modern.FIELD=V")
        out[prefix].append((field, value))
        i += 1
    return out


def build_configs(args: argparse.Namespace, extra: list[str]) -> dict[str, config_lib.ConfigDict]:
    """The two recipes' configs with the comparison's settings and the command line's overrides.
    With `--gpt2_run` the GPT-2 config is that run's, and the modern recipe takes its data,
    tokenizer, seed and evaluation settings."""
    over = parse_overrides(extra)
    configs = {}
    if args.gpt2_run:
        if over["gpt2"] or args.corpus:
            raise UserError("--gpt2.* and --corpus do not apply with --gpt2_run (that run is already trained)")
        configs["gpt2"] = read_run_config(RunDir.at(args.gpt2_run))
        if configs["gpt2"] is None:
            raise UserError(f"--gpt2_run {args.gpt2_run!r} holds no run (no config.json)")
    for name, path in (("gpt2", args.gpt2), ("modern", args.modern)):
        if name in configs:
            continue
        c = config_lib.load_config(path)
        if args.corpus:
            c.data.source = f"files:{args.corpus}"
        c.data.cache_dir = args.cache_dir
        c.train.eval_every = args.eval_every
        if args.gpt2_run:
            done = configs["gpt2"]
            c.seed = done.seed
            c.data.update(done.data.to_dict())
            c.tokenizer.update(done.tokenizer.to_dict())
            c.train.update(eval_every=done.train.eval_every, eval_batches=done.train.eval_batches)
        config_lib.apply_overrides(c, over["config"] + over[name])
        # Windows of the training time end at each evaluation; checkpoints only at the end.
        c.train.log_every = c.train.eval_every
        c.train.checkpoint_every = c.train.steps
        configs[name] = c
    a, b = configs["gpt2"], configs["modern"]
    for section, fields in SAME.items():
        for f in fields:
            if a[section][f] != b[section][f]:
                raise UserError(
                    f"the recipes differ in {section}.{f} ({a[section][f]!r} and {b[section][f]!r}); "
                    "the comparison needs the same shape, data, evaluation and tokens per step"
                )
    if a.seed != b.seed:
        raise UserError(f"the recipes differ in seed ({a.seed} and {b.seed}): they would draw different batches")
    if a.train.eval_every % a.train.log_every:
        raise UserError(f"the gpt2 run logs every {a.train.log_every} steps, which does not divide its "
                        f"eval_every={a.train.eval_every}: its training time at each evaluation is unknown")
    return configs


def same_config(workdir: str, config: config_lib.ConfigDict) -> bool:
    """Whether `workdir` holds a run (finished or not) of exactly `config` (see `train_both`)."""
    marker = os.path.join(workdir, "compare_config.json")
    return os.path.isfile(marker) and open(marker).read() == config_lib.to_json(config)


def finished(workdir: str, steps: int) -> bool:
    return any(step == steps and "val_loss" in m for step, m in read_metrics(workdir))


def read_metrics(workdir: str) -> list[tuple[int, dict[str, float]]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [(m["step"], m) for m in map(json.loads, f)]


def curve(workdir: str, config: config_lib.ConfigDict) -> dict[str, Any]:
    """The run's validation curve and training time at each evaluation (see the module doc)."""
    tokens_per_step = config.train.batch_size * config.train.seq_len
    evals, windows, last = [], [], 0
    for step, m in read_metrics(workdir):
        if "tokens_per_s" in m:
            windows.append((step, (step - last) * tokens_per_step / m["tokens_per_s"], step - last))
            last = step
        if "val_loss" in m:
            evals.append((step, m["val_loss"]))
    if not evals or not windows:
        raise UserError(f"{workdir} has no validation loss or throughput in metrics.jsonl")
    per_step = sorted(t / n for _, t, n in windows[1:]) or [windows[0][1] / windows[0][2]]
    median = per_step[len(per_step) // 2]
    clock, elapsed, compiling = {}, 0.0, 0.0
    for i, (step, t, n) in enumerate(windows):
        if i == 0 or t > 3 * median * n:  # a (re)compilation: the first window, or one a resume started
            compiling += t - median * n
            t = median * n
        elapsed += t
        clock[step] = elapsed
    times = [clock[s] if s in clock else math.nan for s, _ in evals]
    return {
        "steps": [s for s, _ in evals],
        "val_loss": [v for _, v in evals],
        "train_s": times,
        "step_s": median,
        "compile_s": compiling,
    }


def train_both(configs: dict[str, config_lib.ConfigDict], root: str, devices: int,
               gpt2_run: str = "") -> dict[str, dict[str, Any]]:
    """Train the runs that are not finished yet, GPT-2 first; the curves of both. A workdir of
    another config starts again (and then so does the next run: its tokenizer is the first
    one's); one of the same config resumes, or is reused when finished. `gpt2_run`: the GPT-2
    run is that finished one."""
    import jax

    from gptjax import train

    devs = jax.devices()[:devices] if devices > 0 else None
    workdirs = {"gpt2": gpt2_run or os.path.join(root, "gpt2"), "modern": os.path.join(root, "modern")}
    first_tokenizer, fresh = None, False
    for name, c in configs.items():
        workdir = workdirs[name]
        if not (name == "gpt2" and gpt2_run) and (fresh or not same_config(workdir, c)):
            fresh = True
            shutil.rmtree(workdir, ignore_errors=True)
            os.makedirs(workdir)
            if first_tokenizer is not None:
                shutil.copytree(first_tokenizer, os.path.join(workdir, "tokenizer"))
            with open(os.path.join(workdir, "compare_config.json"), "w") as f:
                f.write(config_lib.to_json(c))
        if name == "gpt2" and gpt2_run and not finished(workdir, c.train.steps):
            raise UserError(f"--gpt2_run {gpt2_run!r} has not finished its {c.train.steps} steps")
        if finished(workdir, c.train.steps):
            print(f"== reusing the finished {name} run in {workdir}", flush=True)
        else:
            print(f"== training the {name} recipe in {workdir}", flush=True)
            final = train.run(c, workdir, devices=devs)
            if final.get("step") != c.train.steps:
                raise UserError(f"the {name} run stopped at step {final.get('step', 0)} of {c.train.steps}; "
                                "run the same command again to resume it")
        first_tokenizer = first_tokenizer or os.path.join(workdir, "tokenizer")
    return {name: curve(workdirs[name], c) for name, c in configs.items()}


def compare(curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The target (GPT-2's final validation loss) and where the modern run first reaches it."""
    g, m = curves["gpt2"], curves["modern"]
    target = g["val_loss"][-1]
    hit = next((i for i, v in enumerate(m["val_loss"]) if v <= target), None)
    out = {"target_val_loss": target, "gpt2_steps": g["steps"][-1], "gpt2_train_s": g["train_s"][-1],
           "modern_final_val_loss": m["val_loss"][-1], "modern_steps_to_target": None, "modern_train_s_to_target": None}
    if hit is not None:
        out["modern_steps_to_target"] = m["steps"][hit]
        out["modern_train_s_to_target"] = m["train_s"][hit]
        out["step_ratio"] = m["steps"][hit] / g["steps"][-1]
        out["time_ratio"] = m["train_s"][hit] / g["train_s"][-1]
        out["meets_target"] = out["step_ratio"] <= TARGET_STEPS and out["time_ratio"] <= TARGET_TIME
    return out


def table(curves: dict[str, dict[str, Any]], result: dict[str, Any]) -> str:
    rows = [("recipe", "steps", "final val_loss", "steps to target", "train s to target", "s/step", "compile s")]
    g, m = curves["gpt2"], curves["modern"]
    rows.append(("gpt2", str(g["steps"][-1]), f"{g['val_loss'][-1]:.4f}", str(g["steps"][-1]),
                 f"{g['train_s'][-1]:.1f}", f"{g['step_s']:.4f}", f"{g['compile_s']:.1f}"))
    hit = result["modern_steps_to_target"]
    rows.append(("modern", str(m["steps"][-1]), f"{m['val_loss'][-1]:.4f}", "not reached" if hit is None else str(hit),
                 "-" if hit is None else f"{result['modern_train_s_to_target']:.1f}", f"{m['step_s']:.4f}",
                 f"{m['compile_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    lines.append(f"target: the gpt2 recipe's final val_loss {result['target_val_loss']:.4f}")
    if hit is None:
        lines.append("the modern recipe did not reach it")
    else:
        verdict = "met" if result["meets_target"] else "NOT met"
        lines.append(
            f"modern / gpt2: {result['step_ratio']:.2f} of the steps, {result['time_ratio']:.2f} of the training time "
            f"(bar: <= {TARGET_STEPS} and <= {TARGET_TIME}: {verdict})"
        )
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, Any]], result: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("gpt2", "C0"), ("modern", "C1")):
        c = curves[name]
        axes[0].plot(c["steps"], c["val_loss"], style, label=f"{name} recipe")
        axes[1].plot(c["train_s"], c["val_loss"], style, label=f"{name} recipe")
    for ax, xlabel in zip(axes, ("step", "training time (s, evaluation left out)")):
        ax.axhline(result["target_val_loss"], color="gray", linestyle="--", linewidth=0.8, label="gpt2 final val_loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    if result["modern_steps_to_target"] is not None:
        axes[0].axvline(result["modern_steps_to_target"], color="C1", linestyle=":", linewidth=0.8)
        axes[1].axvline(result["modern_train_s_to_target"], color="C1", linestyle=":", linewidth=0.8)
    lo = min(min(c["val_loss"]) for c in curves.values())
    hi = max(c["val_loss"][min(2, len(c["val_loss"]) - 1)] for c in curves.values())
    for ax in axes:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="", help="a text file or glob to train both on (default: the recipes' source)")
    p.add_argument("--gpt2", default=os.path.join(ROOT, "configs", "default.py"), help="the GPT-2 recipe")
    p.add_argument("--modern", default=os.path.join(ROOT, "configs", "modern.py"), help="the modern recipe")
    p.add_argument("--gpt2_run", default="", help="a finished run of the GPT-2 recipe to compare against "
                   "instead of training one (the modern run takes its data, tokenizer and evaluation)")
    p.add_argument("--workdir", default="runs/compare_recipes", help="where the two runs and summary.json go")
    p.add_argument("--eval_every", type=int, default=25, help="validation cadence of both runs (steps)")
    p.add_argument("--cache_dir", default="", help="the token cache of both (default: <workdir>/cache)")
    p.add_argument("--png", default="", help="the loss-curve plot (default: <workdir>/loss_curves.png)")
    p.add_argument("--devices", type=int, default=0, help="devices per run (0: all)")
    args, extra = p.parse_known_args(argv)

    def body() -> dict[str, Any]:
        args.cache_dir = args.cache_dir or os.path.join(os.path.abspath(args.workdir), "cache")
        configs = build_configs(args, extra)
        # As `python -m gptjax.train` does before JAX's backends start: the CPU unless there is
        # an accelerator, and on a CPU one device per core.
        runtime.cpu_unless_accelerated()
        sharding.arrange_cpu_devices(config_lib.sections(configs["modern"]).mesh)
        curves = train_both(configs, args.workdir, args.devices, args.gpt2_run)
        result = compare(curves)
        print(table(curves, result), flush=True)
        corpus = args.corpus or configs["gpt2"].data.source
        png = args.png or os.path.join(args.workdir, "loss_curves.png")
        plot(curves, result, png, f"gpt2 vs modern recipe on {os.path.basename(corpus)}, "
             f"{configs['gpt2'].train.batch_size}x{configs['gpt2'].train.seq_len} tokens/step")
        with open(os.path.join(args.workdir, "summary.json"), "w") as f:
            json.dump({"result": result, "curves": curves, "corpus": corpus}, f, indent=1)
        print(f"plot: {png}\nsummary: {os.path.join(args.workdir, 'summary.json')}")
        return result

    return run_cli(body)


if __name__ == "__main__":
    main()
