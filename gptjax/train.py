"""`python -m gptjax.train`: train or fine-tune a GPT on a device mesh.

    python -m gptjax.train                                   # the built-in CPU demo, in runs/default
    python -m gptjax.train --config configs/gpt2_124m.py --config.optim.lr=3e-4   # in runs/gpt2_124m

The stages, in order:

    resolve   config -> `gptjax.run.Run`: typed sections, mesh, model, optimizer, abstract
              train state and shardings, the jitted steps (`gptjax.step`); nothing written
    prepare   `gptjax.prepare`: the workdir, init_from's weights, the eval tasks' files, the
              tokenizer and the data
    state     `gptjax.outputs.open_outputs`: config.json, the checkpoints and the metrics
              opened, and the state the run starts from: the newest readable checkpoint,
              else init_from's weights, else fresh ones
    loop      `gptjax.loop.train_loop`: steps, evaluation, metrics, checkpoints, stop requests
    finish    the last save written, metrics and checkpoints closed; failures are one line
              (`gptjax.failures`)

Running the same command on the same workdir resumes from its latest checkpoint and continues
the same run: the batch for step s depends only on (seed, s).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys

import jax

from gptjax import checkpoint as ckpt
from gptjax import config as config_lib
from gptjax import layout
from gptjax import optim as optim_lib
from gptjax import metrics, runtime, sharding
from gptjax.errors import UserError, run_cli
from gptjax.failures import RunFailed
from gptjax.loop import train_loop
from gptjax.outputs import open_outputs
from gptjax.prepare import prepare
from gptjax.preemption import StopBeforeTraining, StopRequested
from gptjax.run import Run, resolve
from gptjax.runtime import log


def run(
    config: config_lib.ConfigDict | config_lib.Sections,
    workdir: str,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> dict[str, float]:
    """Train (or resume) the run of `config` (a ConfigDict, or its parsed sections) in `workdir`
    on `devices` (default: as `resolve` picks); return the final metrics.

    `stop_at` ends this invocation early at that step with a checkpoint, as a preemption
    would; running again continues the same run. A SIGTERM or SIGINT does the same at the end
    of the step in progress (see `gptjax.preemption`); before the first step it stops without
    saving and the result is empty. Divergence and failed writes raise `RunFailed`.
    """
    r = resolve(config, workdir, devices)
    if r.sections.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise UserError(metrics.MISSING)  # before any data work, not at the first step
    if r.devices_note:
        log(r.devices_note)
    with StopRequested() as stop:
        try:
            r = prepare(r)
            with open_outputs(r) as out:
                if jax.process_index() == 0:  # stdout, like the summary at the end; stderr is for progress and errors
                    start = f"resuming from step {int(out.state.step)}" if r.resuming else "a new run"
                    print(f"workdir {workdir}: {start}", flush=True)
                final = train_loop(r, out, stop, stop_at)
        except StopBeforeTraining as e:
            log(f"stopped by {e} before training started; nothing to save. Run the same command again to continue.")
            return {}
    if final["step"] < r.train.steps:
        log(f"stopped at step {final['step']}; checkpoint saved. Run the same command again to resume.")
    return final


def dry_run(config: config_lib.ConfigDict | config_lib.Sections, workdir: str) -> None:
    """Print how each parameter would be optimized (labels, learning rates, the schedule), the
    mesh and devices, the tokenizer and, for a workdir with checkpoints, the one a run would
    resume from; write nothing."""
    r = resolve(config, workdir)
    if r.devices_note:
        log(r.devices_note)
    print(optim_lib.format_param_table(r.steps.layout.abstract_params, r.optimizer))
    print(f"mesh:      {sharding.describe_mesh(r.mesh)}")
    print(r.tokenizer_note)
    if r.resuming:
        _report_resume_point(r)


def _report_resume_point(r: Run) -> None:
    """For --dry_run: the checkpoint a run would resume from (read in full, as training would),
    each unreadable newer one reported in one line and left where it is."""
    assert r.run_dir is not None
    checkpointer = ckpt.Checkpointer(r.run_dir, keep=r.train.keep_checkpoints)
    try:
        target = r.steps.layout.abstract_state
        restored = checkpointer.restore_latest(target.params, target.opt_state, set_aside=False)
    finally:
        checkpointer.close()
    if restored is not None:
        print(f"would resume from checkpoint {restored[2]['step']} in {checkpointer.directory}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.train",
        description="Train or fine-tune a GPT. Any config field can be set with --config.section.field=value.",
    )
    parser.add_argument("--config", default="", help="a config file with get_config() (default: the built-in CPU demo)")
    parser.add_argument(
        "--workdir", default="", help="run directory: checkpoints, metrics, tokenizer (default: runs/<config file stem>)"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the parameter table (labels, learning rates) and exit")
    args, rest = parser.parse_known_args(argv)

    def body() -> None:
        runtime.cpu_unless_accelerated()  # before anything starts JAX's backends
        runtime.quiet_background_errors()
        runtime.enable_compilation_cache()
        sharding.maybe_initialize_distributed()
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        sections = config_lib.sections(config)
        sharding.arrange_cpu_devices(sections.mesh)  # before anything starts JAX's backends
        workdir = args.workdir or layout.default_workdir(args.config)
        if args.dry_run:
            return dry_run(sections, workdir)
        try:
            final = run(sections, workdir)
        except RunFailed as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if jax.process_index() != 0 or "step" not in final:
            return
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "val_loss", "val_ppl", "val_bpb") if k in final)
        print(f"done: step {final.get('step')}; {summary}")
        print(f"checkpoint: {layout.RunDir.at(workdir).checkpoints}")
        print(f'sample:     python -m gptjax.sample --workdir {shlex.quote(workdir)} --prompt "def " --max_new_tokens 500')

    run_cli(body)


if __name__ == "__main__":
    main()
