"""`python -m gptjax.plot`: training and validation curves of one or more runs, in one PNG.

    python -m gptjax.plot runs/a runs/b -o curves.png

Each run's metrics.jsonl gives the panels, one row each: the loss (training solid, validation
dashed), validation bits per byte, and every benchmark metric (`eval/<task>/<metric>`) any of
the runs logged; the left column plots them against steps, the right one against tokens
trained on (step x train.batch_size x train.seq_len, from the run's config.json). One colour
per run, labelled with its directory's name. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gptjax.errors import UserError, run_cli


def read_run(workdir: str) -> tuple[list[dict[str, float]], int]:
    """(metrics.jsonl records, tokens per step) of a run directory."""
    from gptjax.checkpoint_read import read_run_config
    from gptjax.layout import RunDir

    run = RunDir.at(workdir)
    if not os.path.isfile(run.metrics):
        raise UserError(f"{workdir!r} has no metrics.jsonl; give gptjax run directories")
    config = read_run_config(run)
    tokens_per_step = int(config.train.batch_size) * int(config.train.seq_len) if config is not None else 0
    with open(run.metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records, tokens_per_step


def panels(runs: list[list[dict[str, float]]]) -> list[list[str]]:
    """The metrics of each panel: the losses, val_bpb, then each eval metric (in the order first logged)."""
    keys: list[str] = []
    for records in runs:
        for record in records:
            keys += [k for k in record if k not in keys]
    out = [[k for k in ("loss", "val_loss") if k in keys]]
    if "val_bpb" in keys:
        out.append(["val_bpb"])
    out += [[k] for k in keys if k.startswith("eval/") and not k.endswith("/items")]
    return [p for p in out if p]


def series(records: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric."""
    points = [(int(r["step"]), float(r[key])) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def run_names(workdirs: list[str]) -> list[str]:
    """Each run's directory name, or its path where names repeat."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def plot(workdirs: list[str], out: str) -> None:
    """Write the curves of `workdirs` to the PNG `out`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("python -m gptjax.plot needs matplotlib: pip install -e '.[plot]'") from None
    runs = [read_run(w) for w in workdirs]
    rows = panels([records for records, _ in runs])
    if not rows:
        raise UserError(f"no loss or evaluation metrics in {workdirs}")
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.2 * len(rows)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, keys in enumerate(rows):
        for j, (name, (records, per_step)) in enumerate(zip(run_names(workdirs), runs)):
            for key in keys:
                steps, values = series(records, key)
                if not steps:
                    continue
                style: dict[str, Any] = {"color": colors[j % len(colors)], "linestyle": "--" if key.startswith("val_") and
                                         len(keys) > 1 else "-", "label": f"{name} {key}"}
                if len(steps) < 3:
                    style["marker"] = "o"
                axes[i][0].plot(steps, values, **style)
                axes[i][1].plot([s * per_step for s in steps], values, **style)
        for col, xlabel in enumerate(("step", "tokens")):
            ax = axes[i][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(keys[-1] if len(keys) == 1 else "loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        p = argparse.ArgumentParser(prog="python -m gptjax.plot", description="Plot runs' loss and evaluation curves.")
        p.add_argument("workdirs", nargs="+", help="run directories (each with metrics.jsonl)")
        p.add_argument("-o", "--out", default="curves.png", help="the PNG to write")
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        plot(args.workdirs, args.out)
        print(f"wrote {args.out}")

    run_cli(body)


if __name__ == "__main__":
    main()
