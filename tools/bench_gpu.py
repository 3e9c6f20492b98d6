"""A GPU's training and decoding speed against its own peak: one prepared run (under 8 minutes).

    python tools/bench_gpu.py                    # on a GPU machine: the 124M recipe
    python tools/bench_gpu.py --tiny             # a tiny shape, 3 steps: a smoke run on any machine

Training: the 124M recipe (`configs/gpt2_124m.py`, as configured: bf16, `model.attention`
"auto", i.e. cuDNN's fused attention on a GPU, the padded vocabulary) on synthetic tokens, one
device, micro-batches of --batch rows of --seq tokens with no accumulation, --steps steps after
--warmup; it prints the median step time, tokens/s and MFU: model FLOPs (6N + attention per
token, `GPTConfig.flops_per_token`) per second over the card's dense bf16 peak.

Decoding: `gptjax.sampling` on the trained parameters, greedy, batch 1 and 8, --new tokens after
a --prompt-token prompt; new tokens/s of a whole call (the median of --repeats after a
compiling call) against the HBM bandwidth bound: every weight read once per step, plus the
keys and values of the context (`bench_sample.step_bytes`), over the card's HBM bandwidth.

The card's peak and bandwidth come from `gptjax.chips.GPUS` by its device kind (--peak_tflops and
--hbm_gbps override them; an unknown card, or a CPU, prints n/a for the ratios).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gptjax import chips  # noqa: E402
from gptjax import config as config_lib  # noqa: E402
from gptjax import run as run_lib  # noqa: E402
from gptjax.sampling import Decoder  # noqa: E402

TINY = ["--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=64",
        "--config.model.block_size=32", "--config.tokenizer.vocab_size=256"]


def _bench_sample():
    """tools/bench_sample.py as a module (its `median_time` and `step_bytes`)."""
    spec = importlib.util.spec_from_file_location("bench_sample", os.path.join(os.path.dirname(__file__), "bench_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card(device: jax.Device, peak_tflops: float, hbm_gbps: float) -> tuple[str, float | None, float | None]:
    """(device kind, bf16 FLOP/s, HBM bytes/s): the flags', else the card's in `gptjax.chips.GPUS`
    (None: unknown)."""
    kind = device.device_kind
    known = chips.chip_of(kind) if device.platform == "gpu" else None
    peak = peak_tflops or (known and known.bf16_tflops)
    bw = hbm_gbps or (known and known.hbm_gbps)
    return kind, peak and peak * 1e12, bw and bw * 1e9


def ratio(x: float, peak: float | None) -> str:
    return f"{x / peak:.1%}" if peak else "n/a"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "gpt2_124m.py"))
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model, 3 steps: a smoke run (CPU)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="rows per step (one micro-batch)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=256, help="new tokens per decode call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=0.0)
    p.add_argument("--hbm_gbps", type=float, default=0.0)
    args, rest = p.parse_known_args(argv)
    if args.tiny:
        rest = TINY + rest
        args.steps, args.warmup, args.batch, args.seq, args.prompt, args.new, args.repeats = 3, 1, 4, 32, 8, 8, 1
    config = config_lib.load_config(args.config)
    overrides = [f"--config.train.batch_size={args.batch}", "--config.train.grad_accum=1",
                 f"--config.train.seq_len={args.seq}", "--config.mesh.data=1", "--config.mesh.fsdp=1",
                 "--config.mesh.tensor=1", *rest]
    config_lib.apply_overrides(config, config_lib.parse_overrides(overrides))
    device = jax.devices()[0]
    run = run_lib.resolve(config, None, [device])
    gpt, steps = run.model, run.steps
    kind, peak, bw = card(device, args.peak_tflops, args.hbm_gbps)
    print(f"{kind} ({device.platform}); model {gpt.num_params() / 1e6:.1f}M params, attention {gpt.attention}, "
          f"dtype {gpt.dtype}; {args.batch} x {args.seq} tokens per step")

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, gpt.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((args.batch, args.seq), np.float32)}
    state = steps.init_state()
    start = time.perf_counter()
    state, metrics = steps.train_step(state, batch)
    jax.block_until_ready(metrics)
    print(f"train step compiled and ran once in {time.perf_counter() - start:.1f} s")
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = steps.train_step(state, batch)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens_per_s = args.batch * args.seq / step
    flops = gpt.flops_per_token(args.seq) * tokens_per_s
    print(f"train: {step * 1e3:.1f} ms/step (median of {len(times)}), {tokens_per_s:,.0f} tokens/s, "
          f"{flops / 1e12:.1f} TFLOP/s, MFU {ratio(flops, peak)}, loss {float(metrics['loss']):.3f}")

    bench_sample = _bench_sample()
    params = jax.device_get(state.params)
    decoder = Decoder(gpt, params)
    for rows in (1, 8):
        prompts = [list(rng.integers(0, gpt.vocab_size, args.prompt)) for _ in range(rows)]
        call = lambda: decoder.generate_tokens(prompts, max_new_tokens=args.new, temperature=0.0)  # noqa: E731
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        seconds = bench_sample.median_time(call, args.repeats)
        per_s = rows * args.new / seconds
        bound = rows / (bench_sample.step_bytes(gpt, rows, args.prompt, args.new) / bw) if bw else None
        print(f"decode batch {rows}: {per_s:,.1f} new tokens/s (first call {first:.1f} s with compiling), "
              f"HBM bound {f'{bound:,.0f}' if bound else 'n/a'} tokens/s, {ratio(per_s, bound)} of it")


if __name__ == "__main__":
    main()
