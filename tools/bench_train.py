"""Benchmark gptjax's train step against Hugging Face GPT-2 on PyTorch CPU, in the same run.

    python tools/bench_train.py                       # the three standard shapes
    python tools/bench_train.py --shapes nanogpt --steps 20
    python tools/bench_train.py --config configs/tiny_shakespeare.py --batch 8 --seq 128

For each shape it reports, for gptjax's jitted train step (`gptjax.step.Trainer.train_step_fn`: forward,
backward, global-norm clip and AdamW, state donated) and for transformers'
`GPT2LMHeadModel` (forward with labels, backward, `clip_grad_norm_`, `torch.optim.AdamW`):

- compile: lowering + XLA compilation of the step (JAX only);
- step: the median wall time of `--steps` steps after `--warmup` untimed ones (the batch is
  already on the device, so the time is the step's, not the input pipeline's);
- tokens/s: batch * seq / step;
- MFU: model FLOPs (`GPTConfig.flops_per_token`, 6N + 12 L d T per token) per second, over
  the FLOP/s of a large `jnp` matmul in the compute dtype (fp32 accumulation, as the model's)
  timed in the same process just before (median);
- peak MB: the peak resident memory of the step over the memory after imports. Each
  framework runs in its own subprocess; the baseline is VmRSS after imports (and after the
  matmul probe, its buffers freed and `malloc_trim`-ed); after building the model, optimizer
  and (for JAX) compiling, the process trims the heap again and resets its high-water mark
  (`/proc/self/clear_refs` = 5), runs the steps, and reads VmHWM. So the figure covers the
  parameters, optimizer state, gradients, activations and the framework's workspace during
  steps, but not the compiler's transient memory (shown separately as "compile MB" for JAX).
- vs HF: gptjax tokens/s over transformers' tokens/s, and transformers' peak over gptjax's.

Both sides use the same precision, the same shape, dropout 0, and `os.cpu_count()` threads:
fp32 by default; `--dtype bfloat16` runs gptjax with `model.dtype="bfloat16"` (bf16 matmul
operands, fp32 accumulation, parameters and optimizer state) and transformers under torch's
CPU autocast to bf16 (fp32 weights and optimizer). `--remat` turns on `model.remat` for
gptjax (transformers keeps all activations; its own gradient checkpointing is not used).
CPU timings are noisy: compare ratios from one run, and use `--rounds` to alternate the two
frameworks more than once (medians over rounds are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (n_layer, n_head, n_embd, block_size, vocab, batch, seq); "default" comes from the config.
SHAPES: dict[str, dict[str, int]] = {
    "nanogpt": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, batch=12, seq=64),
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch=8, seq=256),
    # A tiny shape for the smoke test (--quick).
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64, batch=2, seq=16),
}
DEFAULT_SHAPES = ("default", "nanogpt", "gpt2_124m")


def shape_from_config(path: str, batch: int | None = None, seq: int | None = None) -> dict[str, int]:
    """The model and batch shape of a config file, as a run of it resolves them (the
    vocabulary included: model.vocab_size 0 takes the tokenizer's)."""
    sys.path.insert(0, REPO)
    import jax

    from gptjax import config as config_lib
    from gptjax.run import resolve

    c = config_lib.load_config(path)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    run = resolve(c, None, devices=jax.devices()[:1])
    m, t = run.model, run.train
    return dict(
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        n_mlp=m.n_mlp,
        block_size=m.block_size,
        vocab_size=m.vocab_size,
        batch=batch or t.batch_size,
        seq=seq or t.seq_len,
    )


def spec_config(spec: dict[str, Any]) -> Any:
    """The gptjax config of a benchmark shape: the base config (its optimizer) with the
    shape's model and batch, dropout 0, on one device."""
    from gptjax import config as config_lib

    c = config_lib.base_config()
    c.model.update(
        vocab_size=spec["vocab_size"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_embd=spec["n_embd"],
        n_mlp=spec.get("n_mlp", 0),
        block_size=spec["block_size"],
        dropout=0.0,
        dtype=spec.get("dtype", "float32"),
        remat=bool(spec.get("remat", False)),
    )
    c.train.update(batch_size=spec["batch"], seq_len=spec["seq"], grad_accum=1)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


# -- memory ---------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Give freed heap pages back to the OS so they do not count as the step's memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- workers (each in its own subprocess) ----------------------------------------------------


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def worker_jax(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np

    sys.path.insert(0, REPO)
    from gptjax.metrics import measure_matmul_flops
    from gptjax.run import resolve

    dtype = spec.get("dtype", "float32")
    peak_flops = measure_matmul_flops(spec["matmul_n"], spec["matmul_repeats"], dtype)
    _trim()
    base_kb = _status_kb("VmRSS")

    run = resolve(spec_config(spec), None, devices=jax.devices()[:1])
    gpt, trainer = run.model, run.trainer
    b, t = spec["batch"], spec["seq"]
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, gpt.vocab_size, (b, t + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32)}
    with trainer.context():
        batch = trainer.to_global(host, accum=True)
        t0 = time.perf_counter()
        compiled = trainer.train_step_fn.lower(state, batch).compile(compiler_options=spec.get("xla_options") or None)
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    compile_kb = _status_kb("VmHWM") - base_kb
    _trim()
    _reset_peak()

    holder = {"state": state}

    def step() -> None:
        s, m = compiled(holder["state"], batch)
        holder["state"] = s
        jax.block_until_ready((s, m))

    times = _time_steps(step, spec["warmup"], spec["steps"])
    peak_kb = _status_kb("VmHWM") - base_kb
    loss = float(jax.device_get(compiled(holder["state"], batch)[1]["loss"]))
    return dict(
        compile_s=compile_s,
        step_s=_median(times),
        times=times,
        peak_mb=peak_kb / 1024,
        compile_mb=compile_kb / 1024,
        xla_temp_mb=getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else None,
        matmul_flops=peak_flops,
        flops_per_token=gpt.flops_per_token(t),
        loss=loss,
    )


def worker_guard(spec: dict[str, Any]) -> dict[str, Any]:
    """The non-finite guard's cost: the same step compiled with and without it, timed in
    alternating blocks in one process (so both see the same machine)."""
    import jax
    import numpy as np

    sys.path.insert(0, REPO)
    from gptjax.run import resolve
    from gptjax.step import Trainer

    run = resolve(spec_config(spec), None, devices=jax.devices()[:1])
    b, t = spec["batch"], spec["seq"]
    tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, (b, t + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32)}
    variants = {}
    for name, guard in (("guard", True), ("no_guard", False)):
        trainer = run.trainer if guard else Trainer(run.model, run.optimizer, run.mesh, run.seed, 1, nonfinite_guard=False)
        state = trainer.init_state()
        with trainer.context():
            batch = trainer.to_global(host, accum=True)
            compiled = trainer.train_step_fn.lower(state, batch).compile()
        variants[name] = {"compiled": compiled, "state": state, "batch": batch, "times": []}

    def block(v: dict[str, Any], n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            v["state"], m = v["compiled"](v["state"], v["batch"])
            jax.block_until_ready((v["state"], m))
            out.append(time.perf_counter() - t0)
        return out

    for v in variants.values():
        block(v, spec["warmup"])
    per_block = max(1, spec["steps"] // 4)
    for r in range(8):  # alternate which goes first
        order = ("guard", "no_guard") if r % 2 == 0 else ("no_guard", "guard")
        for name in order:
            variants[name]["times"] += block(variants[name], per_block)
    # Both ran the same steps on the same batch from the same start: on finite steps the guard
    # changes nothing, so the states must agree bit for bit (else the two compute different things).
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
        variants["guard"]["state"].params, variants["no_guard"]["state"].params))
    if not same:
        raise RuntimeError("the step with the guard and the step without it reached different parameters")
    g, n = (_median(variants[k]["times"]) for k in ("guard", "no_guard"))
    return dict(guard_s=g, no_guard_s=n, steps_each=len(variants["guard"]["times"]))


def bench_guard(name: str, shape: dict[str, int], args: argparse.Namespace) -> str:
    spec = dict(shape, steps=args.steps, warmup=args.warmup, dtype=args.dtype, remat=args.remat)
    r = run_worker("guard", spec)
    cost = r["guard_s"] / r["no_guard_s"] - 1.0
    return (f"| {name} | {shape['batch']} x {shape['seq']} | {1e3 * r['guard_s']:.2f} | {1e3 * r['no_guard_s']:.2f} "
            f"| {100 * cost:+.1f}% | {r['steps_each']} |")


def worker_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    _trim()
    base_kb = _status_kb("VmRSS")
    torch.manual_seed(0)
    n_mlp = spec.get("n_mlp", 0) or None
    cfg = GPT2Config(
        vocab_size=spec["vocab_size"],
        n_positions=spec["block_size"],
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_inner=n_mlp,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_new",
    )
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    b, t = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab_size"], (b, t), generator=g)
    losses = []

    # bf16: torch's CPU autocast (fp32 weights and optimizer, bf16 matmuls), the same mixed
    # precision as gptjax's model.dtype="bfloat16".
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("dtype") == "bfloat16")

    def step() -> None:
        with autocast:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))

    step()  # the first step allocates the optimizer state; count it as set-up
    _trim()
    _reset_peak()
    times = _time_steps(step, max(0, spec["warmup"] - 1), spec["steps"])
    peak_kb = _status_kb("VmHWM") - base_kb
    return dict(
        step_s=_median(times),
        times=times,
        peak_mb=peak_kb / 1024,
        attn=getattr(model.config, "_attn_implementation", "?"),
        loss=losses[-1],
    )


def start_worker(kind: str, spec: dict[str, Any]) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--spec", json.dumps(spec)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def finish_worker(kind: str, proc: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{stderr[-4000:]}")
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{kind} worker printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return finish_worker(kind, start_worker(kind, spec))


# -- the table --------------------------------------------------------------------------------

COLUMNS = (
    "shape",
    "params",
    "batch x seq",
    "framework",
    "compile s",
    "step ms",
    "tokens/s",
    "MFU",
    "peak MB",
    "vs HF tokens/s",
    "HF peak / peak",
)


def bench_shape(name: str, shape: dict[str, int], args: argparse.Namespace) -> list[dict[str, str]]:
    spec = dict(
        shape,
        steps=args.steps,
        warmup=args.warmup,
        matmul_n=args.matmul_n,
        matmul_repeats=args.matmul_repeats,
        xla_options=dict(_parse_option(o) for o in args.xla_option),
        dtype=args.dtype,
        remat=args.remat,
    )
    jax_runs, torch_runs = [], []
    for _ in range(args.rounds):
        if args.parallel and not args.no_torch:  # smoke tests only: the two disturb each other's timings
            pj, pt = start_worker("jax", spec), start_worker("torch", spec)
            jax_runs.append(finish_worker("jax", pj))
            torch_runs.append(finish_worker("torch", pt))
            continue
        jax_runs.append(run_worker("jax", spec))
        if not args.no_torch:
            torch_runs.append(run_worker("torch", spec))
    tokens = shape["batch"] * shape["seq"]
    j = {k: _median([r[k] for r in jax_runs]) for k in ("compile_s", "step_s", "peak_mb", "matmul_flops", "compile_mb")}
    fpt = jax_runs[0]["flops_per_token"]
    params = _count_params(shape)
    rows = []
    jrow = {
        "shape": name,
        "params": f"{params / 1e6:.2f}M",
        "batch x seq": f"{shape['batch']} x {shape['seq']}",
        "framework": "gptjax (JAX)",
        "compile s": f"{j['compile_s']:.1f}",
        "step ms": f"{1e3 * j['step_s']:.1f}",
        "tokens/s": f"{tokens / j['step_s']:.0f}",
        "MFU": f"{100 * fpt * tokens / j['step_s'] / j['matmul_flops']:.1f}%",
        "peak MB": f"{j['peak_mb']:.0f}",
        "vs HF tokens/s": "",
        "HF peak / peak": "",
        "_matmul_gflops": j["matmul_flops"] / 1e9,
        "_compile_mb": j["compile_mb"],
        "_jax_times": [r["times"] for r in jax_runs],
    }
    rows.append(jrow)
    if torch_runs:
        tt = {k: _median([r[k] for r in torch_runs]) for k in ("step_s", "peak_mb")}
        jrow["vs HF tokens/s"] = f"{tt['step_s'] / j['step_s']:.2f}x"
        jrow["HF peak / peak"] = f"{tt['peak_mb'] / max(j['peak_mb'], 1e-9):.2f}x"
        rows.append(
            {
                "shape": name,
                "params": f"{params / 1e6:.2f}M",
                "batch x seq": f"{shape['batch']} x {shape['seq']}",
                "framework": f"transformers (torch, {torch_runs[0]['attn']})",
                "compile s": "-",
                "step ms": f"{1e3 * tt['step_s']:.1f}",
                "tokens/s": f"{tokens / tt['step_s']:.0f}",
                "MFU": f"{100 * fpt * tokens / tt['step_s'] / j['matmul_flops']:.1f}%",
                "peak MB": f"{tt['peak_mb']:.0f}",
                "vs HF tokens/s": "1.00x",
                "HF peak / peak": "1.00x",
                "_torch_times": [r["times"] for r in torch_runs],
            }
        )
    return rows


def _parse_option(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    low = raw.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    try:
        return key.strip(), int(raw)
    except ValueError:
        return key.strip(), raw.strip()


def _count_params(shape: dict[str, int]) -> int:
    sys.path.insert(0, REPO)
    from gptjax.model import GPTConfig

    fields = ("vocab_size", "n_layer", "n_head", "n_embd", "n_mlp", "block_size")
    return GPTConfig(**{k: shape[k] for k in fields if k in shape}).num_params()


def format_table(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated: default, {', '.join(SHAPES)}")
    p.add_argument("--config", default="", help="benchmark this config file's shape instead of --shapes")
    p.add_argument("--batch", type=int, default=0, help="with --config: override train.batch_size")
    p.add_argument("--seq", type=int, default=0, help="with --config: override train.seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed steps per framework (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=1, help="alternate JAX / torch subprocesses this many times")
    p.add_argument("--matmul_n", type=int, default=4096, help="size of the square fp32 matmul for the FLOP/s peak")
    p.add_argument("--matmul_repeats", type=int, default=5)
    p.add_argument(
        "--xla_option",
        action="append",
        default=[],
        help="KEY=VALUE compiler option for the JAX step only (repeatable), e.g. "
        "xla_cpu_use_fusion_emitters=true; added to the trainer's own options (with --remat on CPU "
        "it sets xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED itself)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of both frameworks (bfloat16: gptjax model.dtype, torch CPU autocast); "
        "parameters and optimizer state stay fp32; the MFU peak is a matmul in this dtype",
    )
    p.add_argument("--remat", action="store_true", help="gptjax: model.remat (recompute each block in backward)")
    p.add_argument("--no_torch", action="store_true", help="skip the transformers reference")
    p.add_argument(
        "--guard_ab",
        action="store_true",
        help="instead of the table: the non-finite guard's cost, the step with and without it "
        "timed in alternating blocks in one process (medians)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny shape, 2 steps, both workers at once: a smoke test")
    p.add_argument("--json", default="", help="also write the rows (with raw step times) to this file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parallel = False

    if args.worker:
        spec = json.loads(args.spec)
        result = {"jax": worker_jax, "torch": worker_torch, "guard": worker_guard}[args.worker](spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.quick:
        args.steps, args.warmup, args.matmul_n, args.matmul_repeats = 2, 1, 256, 2
        args.parallel = True
        shapes = [("tiny", SHAPES["tiny"])]
    elif args.config:
        shapes = [(os.path.basename(args.config), shape_from_config(args.config, args.batch, args.seq))]
    else:
        shapes = []
        for name in args.shapes.split(","):
            name = name.strip()
            if name == "default":
                shapes.append(("default", shape_from_config(os.path.join(REPO, "configs", "default.py"))))
            elif name in SHAPES:
                shapes.append((name, SHAPES[name]))
            else:
                p.error(f"unknown shape {name!r}; allowed: default, {', '.join(SHAPES)}")

    if args.guard_ab:
        print("| shape | batch x seq | step ms, guard | step ms, no guard | guard cost | steps each |")
        print("|---|---|---|---|---|---|")
        for name, shape in shapes:
            print(bench_guard(name, shape, args), flush=True)
        print(f"\nmedians over steps timed in 8 alternating blocks per variant; {os.cpu_count()} CPU threads; {args.dtype}")
        return

    rows: list[dict[str, Any]] = []
    for name, shape in shapes:
        print(f"benchmarking {name}: {shape}", file=sys.stderr, flush=True)
        rows.extend(bench_shape(name, shape, args))
    matmul = ", ".join(f"{r['shape']} {r['_matmul_gflops']:.0f}" for r in rows if "_matmul_gflops" in r)
    print(format_table(rows))
    print()
    print(
        f"steps: median of {args.steps} after {args.warmup} warm-up; {os.cpu_count()} CPU threads; {args.dtype}"
        f"{', gptjax remat' if args.remat else ''}. "
        f"MFU peak: {args.matmul_n}^2 {args.dtype} jnp matmul, GFLOP/s per shape: {matmul}. "
        f"peak MB: VmHWM during steps over VmRSS after imports."
        + (f" JAX compiler options: {args.xla_option}." if args.xla_option else "")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
