"""`python -m gptjax.train`: train or fine-tune a GPT on a device mesh.

    python -m gptjax.train                                   # the built-in CPU demo, in runs/default
    python -m gptjax.train --config configs/gpt2_124m.py --config.optim.lr=3e-4   # in runs/gpt2_124m

Data flow: config -> `gptjax.run.resolve` (mesh, model, optimizer, abstract train state and
shardings) -> `Run.prepare` (tokenizer, data) -> train state, created already sharded or
restored -> the trainer's jitted step (`gptjax.step`) in a loop -> evaluation, metrics and
checkpoints. Running the same command on the same workdir resumes from its latest checkpoint
and continues the same run: the batch for step s depends only on (seed, s).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import checkpoint as ckpt
from gptjax import config as config_lib
from gptjax import layout
from gptjax import optim as optim_lib
from gptjax import sharding
from gptjax.errors import run_cli
from gptjax.metrics import MetricsWriter, peak_flops
from gptjax.preemption import StopRequested
from gptjax.run import Run, resolve
from gptjax.step import TrainState


def run(
    config: config_lib.ConfigDict,
    workdir: str,
    dry_run: bool = False,
    devices: list[jax.Device] | None = None,
    stop_at: int | None = None,
) -> dict[str, float]:
    """Train (or resume) the run in `workdir` on `devices` (default: all); return the final metrics.

    `stop_at` ends this invocation early at that step with a checkpoint, as a preemption
    would; running again continues the same run.
    """
    r = resolve(config, workdir, devices)
    if dry_run:
        print(optim_lib.format_param_table(r.trainer.abstract_params, r.optimizer))
        return {}
    assert r.run_dir is not None
    resume_from = r.run_dir.steps()[-1] if r.resuming else None
    if jax.process_index() == 0:  # stdout, like the summary at the end; stderr is for progress and errors
        print(f"workdir {workdir}: " + (f"resuming from step {resume_from}" if r.resuming else "a new run"), flush=True)
    r = r.prepare()
    assert r.dataset is not None
    trainer, gpt, mesh, t = r.trainer, r.model, r.mesh, r.train
    if jax.process_index() == 0:
        ckpt.save_config(r.run_dir, r.config)

    checkpointer = ckpt.Checkpointer(r.run_dir, keep=t.keep_checkpoints)
    state = _initial_state(r, checkpointer)
    start = int(state.step)

    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = gpt.flops_per_token(t.seq_len) * tokens_per_step
    peak = peak_flops(t.peak_tflops, mesh)
    eval_data = r.dataset.eval_batches(t.micro_batch, t.seq_len, t.eval_batches, jax.process_index(), jax.process_count())
    writer = MetricsWriter(r.run_dir)
    _log(
        f"model: {gpt.num_params() / 1e6:.2f}M params, {gpt.n_layer} layers, width {gpt.n_embd}; "
        f"mesh {dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} device(s); "
        f"vocab {gpt.vocab_size}; {tokens_per_step} tokens/step"
    )

    def get_batch(step: int) -> dict[str, np.ndarray]:
        return r.dataset.get_batch(step, t.batch_size, t.seq_len, r.seed, jax.process_index(), jax.process_count())

    def save(step: int, state: TrainState) -> None:
        checkpointer.save(step, state.params, state.opt_state)

    final: dict[str, float] = {}
    last_saved = start
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True, unit="step")
    window_start, window_steps = time.perf_counter(), 0
    with StopRequested() as stop:
        for step in range(start, t.steps):
            state, metrics = trainer.train_step(state, get_batch(step))
            window_steps += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                m["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                m["mfu"] = flops_per_step * window_steps / elapsed / peak
                writer.write(done, m)
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
                final.update(m)
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            if t.eval_batches and (done % t.eval_every == 0 or done == t.steps):
                val = trainer.evaluate(state.params, eval_data)
                ev = {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
                writer.write(done, ev)
                final.update(ev)
                bar.write(f"step {done}: val_loss {val:.4f}  val_ppl {ev['val_ppl']:.2f}")
                window_start = time.perf_counter()
            if done % t.checkpoint_every == 0 or done == t.steps:
                save(done, state)
                last_saved = done
            if stop.requested or done == stop_at:
                break
    bar.close()
    done = int(state.step)
    if done != last_saved:
        save(done, state)
    checkpointer.close()
    writer.close()
    if done < t.steps:
        _log(f"stopped at step {done}; checkpoint saved. Run the same command again to resume.")
    final["step"] = done
    return final


def _initial_state(r: Run, checkpointer: ckpt.Checkpointer) -> TrainState:
    """The latest checkpoint's state, else init_from's parameters, else fresh ones."""
    latest = checkpointer.latest_step()
    if latest is not None:
        target = r.trainer.abstract_state()
        params, opt_state, data_step = checkpointer.restore(latest, target.params, target.opt_state)
        return TrainState(step=jnp.asarray(data_step, jnp.int32), params=params, opt_state=opt_state)
    if r.pretrained is not None:
        return r.trainer.state_from_params(r.pretrained)
    return r.trainer.init_state()


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk so a resumed or repeated run skips most compilation.

    JAX_COMPILATION_CACHE_DIR chooses the place (empty: off); the default is ~/.cache/gptjax/xla.
    """
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/gptjax/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


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
        enable_compilation_cache()
        sharding.maybe_initialize_distributed()
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        workdir = args.workdir or layout.default_workdir(args.config)
        final = run(config, workdir, dry_run=args.dry_run)
        if args.dry_run or jax.process_index() != 0:
            return
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "val_loss", "val_ppl") if k in final)
        print(f"done: step {final.get('step')}; {summary}")
        print(f"checkpoint: {layout.RunDir.at(workdir).checkpoints}")
        print(f'sample:     python -m gptjax.sample --workdir {shlex.quote(workdir)} --prompt "def " --max_new_tokens 500')

    run_cli(body)


if __name__ == "__main__":
    main()
