"""Benchmark gptjax's train step against two PyTorch references on the CPU, in the same run.

    python tools/bench_train.py                       # the three standard shapes
    python tools/bench_train.py --shapes nanogpt --steps 20
    python tools/bench_train.py --config configs/tiny_shakespeare.py --batch 8 --seq 128
    python tools/bench_train.py --shapes nanogpt --check 5   # same losses as the nanoGPT reference?

For each shape it reports, for gptjax's jitted train step (`gptjax.step.train_step`: forward,
backward, global-norm clip and AdamW, state donated), for transformers' `GPT2LMHeadModel`
(forward with labels, backward, `clip_grad_norm_`, `torch.optim.AdamW`) and for a minimal GPT
written as nanoGPT writes it (`nanogpt_model`: one fused qkv `Linear`,
`F.scaled_dot_product_attention(is_causal=True)`, tied head; `clip_grad_norm_` and
`torch.optim.AdamW(fused=True)` with gptjax's hyperparameters and weight-decay mask; no
`torch.compile`):

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
- vs HF, vs nanoGPT: the row's tokens/s over transformers' and over the nanoGPT reference's;
  HF peak / peak: transformers' peak over the row's.

`--check STEPS` shows that gptjax and the nanoGPT reference compute the same thing: both
start from gptjax's initial weights (copied into the torch model under GPT-2's names, see
`gptjax.hf`) and train on the same batches with the same optimizer settings at a constant
learning rate; it prints both losses per step (tests/test_bench_tools.py checks this at a
tiny shape in fp32).

All use the same precision, the same shape, dropout 0, and `os.cpu_count()` threads:
fp32 by default; `--dtype bfloat16` runs gptjax with `model.dtype="bfloat16"` (bf16 matmul
operands, fp32 accumulation, parameters and optimizer state) and the torch references under
torch's CPU autocast to bf16 (fp32 weights and optimizer). `--remat` turns on `model.remat`
for gptjax (the references keep all activations). gptjax's step runs data parallel over one
CPU device per core, as `python -m gptjax.train` arranges them by default (the framework
column gives the count; `--devices 1` times a single device). CPU timings are noisy: compare
ratios from one run, and use `--rounds` to alternate the frameworks more than once (medians
over rounds are reported).

`--paired ROUNDS` is the speed comparison that such noise does not decide: the machine's speed
drifts by tens of percent over seconds, so separate subprocesses can each meet a different
stretch of it. It runs gptjax's step and both references in one process, each round a block of
steps of each (order rotating, a pause before each block), and reports the median over rounds
of each round's ratio, its range, and how many rounds gptjax was at least as fast; no memory.

    python tools/bench_train.py --shapes nanogpt,default --paired 30 --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

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
    """The gptjax config of a benchmark shape: the base config (its optimizer, the default mesh:
    data parallel over the devices it is resolved on) with the shape's model and batch, dropout 0."""
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
    c.optim.update(**spec.get("optim", {}))
    return c


def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """A batch of uniform random tokens as numpy arrays (inputs, next-token targets, weights)."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((batch, seq), np.float32)}


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


def _worker_devices(spec: dict[str, Any]) -> list[Any]:
    """The CPU devices of gptjax's step (data parallel): `spec["devices"]` of them, or (0) as
    `python -m gptjax.train` arranges them: one per core unless the environment chose a count;
    in either case as many as divide the batch. Call it before JAX's backends start."""
    import jax

    sys.path.insert(0, REPO)
    from gptjax import sharding
    from gptjax.config import MeshConfig

    if spec.get("devices"):
        jax.config.update("jax_num_cpu_devices", spec["devices"])
    else:
        sharding.arrange_cpu_devices(MeshConfig())
    devices = jax.devices()
    return devices[: max(d for d in range(1, len(devices) + 1) if spec["batch"] % d == 0)]


def gptjax_step(spec: dict[str, Any], devices: list[Any]) -> tuple[Callable[[], Any], Any, Any, float]:
    """(step, model config, compiled step, compile seconds) of gptjax's train step at `spec`,
    compiled for `devices` with spec's XLA options, on a fixed random batch. `step()` runs one
    step on the state the previous one left (donated) and returns its metrics, once ready."""
    import jax

    sys.path.insert(0, REPO)
    from gptjax.run import resolve

    run = resolve(spec_config(spec), None, devices=devices)
    steps = run.steps
    state = steps.init_state()
    host = random_batch(run.model.vocab_size, spec["batch"], spec["seq"])
    with steps.layout.context():
        batch = steps.layout.to_global(host, accum=True)
        t0 = time.perf_counter()
        compiled = steps.train_jit.lower(state, batch).compile(compiler_options=spec.get("xla_options") or None)
        compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step() -> Any:
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    return step, run.model, compiled, compile_s


def worker_jax(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, REPO)
    import gptjax.run  # noqa: F401  (loaded before the memory baseline: not the step's)
    from gptjax.chips import measure_matmul_flops

    devices = _worker_devices(spec)
    dtype = spec.get("dtype", "float32")
    peak_flops = measure_matmul_flops(spec["matmul_n"], spec["matmul_repeats"], dtype)
    _trim()
    base_kb = _status_kb("VmRSS")

    step, gpt, compiled, compile_s = gptjax_step(spec, devices)
    mem = compiled.memory_analysis()
    compile_kb = _status_kb("VmHWM") - base_kb
    _trim()
    _reset_peak()

    times = _time_steps(step, spec["warmup"], spec["steps"])
    peak_kb = _status_kb("VmHWM") - base_kb
    loss = float(step()["loss"])
    return dict(
        compile_s=compile_s,
        step_s=_median(times),
        times=times,
        peak_mb=peak_kb / 1024,
        compile_mb=compile_kb / 1024,
        xla_temp_mb=getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else None,
        matmul_flops=peak_flops,
        flops_per_token=gpt.flops_per_token(spec["seq"]),
        loss=loss,
        devices=len(devices),
    )


def worker_ab(spec: dict[str, Any]) -> dict[str, Any]:
    """An A/B of the step in one process (so both see the same machine), timed in alternating
    blocks: with and without spec["option"], an XLA option {KEY: VALUE}, or (no option) with
    and without the non-finite guard. On the devices the table's gptjax row uses (one per
    core, data parallel)."""
    import jax
    import numpy as np

    sys.path.insert(0, REPO)
    from gptjax.run import resolve
    from gptjax.step import build_steps

    run = resolve(spec_config(spec), None, devices=_worker_devices(spec))
    host = random_batch(run.model.vocab_size, spec["batch"], spec["seq"])
    option = spec.get("option") or None
    variants = {}
    for name in ("with", "without"):
        with_it = name == "with"
        steps = run.steps if with_it or option else build_steps(run.model, run.optimizer, run.mesh, run.seed, 1,
                                                                nonfinite_guard=False)
        state = steps.init_state()
        with steps.layout.context():
            batch = steps.layout.to_global(host, accum=True)
            compiled = steps.train_jit.lower(state, batch).compile(compiler_options=option if with_it else None)
        temp = compiled.memory_analysis().temp_size_in_bytes
        variants[name] = {"compiled": compiled, "state": state, "batch": batch, "times": [], "cpu": [], "temp": temp}

    def block(v: dict[str, Any], n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            v["state"], m = v["compiled"](v["state"], v["batch"])
            jax.block_until_ready((v["state"], m))
            out.append(time.perf_counter() - t0)
            v["cpu"].append(time.process_time() - c0)
        return out

    for v in variants.values():
        block(v, spec["warmup"])
        v["cpu"].clear()
    per_block = max(1, spec["steps"] // 4)
    for r in range(8):  # alternate which goes first
        for name in ("with", "without") if r % 2 == 0 else ("without", "with"):
            variants[name]["times"] += block(variants[name], per_block)
    # Both ran the same steps on the same batch from the same start: on finite steps the guard
    # changes nothing, nor does a scheduling option, so the states must agree bit for bit (else
    # the two compute different things).
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
        variants["with"]["state"].params, variants["without"]["state"].params))
    if not same:
        what = f"the option {option}" if option else "the guard"
        raise RuntimeError(f"the step with {what} and the step without it reached different parameters")
    out: dict[str, Any] = {"steps_each": len(variants["with"]["times"]), "devices": run.mesh.devices.size}
    for name, v in variants.items():
        out.update({f"{name}_s": _median(v["times"]), f"{name}_cpu_s": _median(v["cpu"]), f"{name}_temp": v["temp"]})
    return out


def worker_paired(spec: dict[str, Any]) -> dict[str, Any]:
    """gptjax's step, the nanoGPT reference's and transformers' in one process, timed in turns.

    The machine's speed drifts by tens of percent over seconds (a step's CPU time drifts with
    its wall time, so it is the CPU, not the program), and a subprocess per framework sees a
    different stretch of it. Here every round times a block of `per_block` steps of each, in an
    order that rotates, with a pause before each block so that the other framework's worker
    threads have gone idle; each round gives each reference's ratio over gptjax, and the
    medians of those ratios are reported (paired: both sides of a ratio ran seconds apart).
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    devices = _worker_devices(spec)
    steps = {"jax": gptjax_step(spec, devices)[0], "nanogpt": nanogpt_train(spec), "torch": transformers_step(spec)[1]}
    for step in steps.values():
        for _ in range(spec["warmup"]):
            step()
    names = list(steps)
    rounds = []
    for r in range(spec["rounds"]):
        block = {}
        for k in names[r % 3:] + names[: r % 3]:
            time.sleep(spec["pause"])
            block[k] = _median(_time_steps(steps[k], 0, spec["per_block"]))
        rounds.append(block)
    return dict(paired_summary(rounds), devices=len(devices))


def paired_summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """From each round's block medians {"jax": s, "nanogpt": s, "torch": s}: each framework's
    median step time, and each reference's ratio to gptjax (reference step / gptjax step,
    gptjax's tokens/s over the reference's) as the median of the rounds' ratios, with their
    range and the number of rounds where gptjax was at least as fast."""
    ratios = {ref: [r[ref] / r["jax"] for r in rounds] for ref in ("nanogpt", "torch")}
    return dict(
        step_s={k: _median([r[k] for r in rounds]) for k in rounds[0]},
        ratio={k: _median(v) for k, v in ratios.items()},
        ratio_range={k: (min(v), max(v)) for k, v in ratios.items()},
        jax_faster_rounds={k: sum(x >= 1.0 for x in v) for k, v in ratios.items()},
        rounds=len(rounds),
    )


PAIRED_PAUSE_S = 0.3  # before each block: the other framework's worker threads go idle


def bench_paired(name: str, shape: dict[str, int], args: argparse.Namespace, per_block: int) -> str:
    """One row of the paired table (`worker_paired`)."""
    spec = dict(shape, warmup=args.warmup, dtype=args.dtype, remat=args.remat, devices=args.devices,
                xla_options=dict(_parse_option(o) for o in args.xla_option), rounds=args.paired,
                per_block=per_block, pause=PAIRED_PAUSE_S)
    spec["torch_optim"] = torch_optim_settings(spec)
    r = run_worker("paired", spec)
    ms = {k: f"{1e3 * v:.1f}" for k, v in r["step_s"].items()}
    tokens = shape["batch"] * shape["seq"]
    cells = [f"{r['ratio'][k]:.2f}x ({r['ratio_range'][k][0]:.2f}-{r['ratio_range'][k][1]:.2f}; "
             f"{r['jax_faster_rounds'][k]} of {r['rounds']})" for k in ("nanogpt", "torch")]
    return (f"| {name} | {shape['batch']} x {shape['seq']}, {r['devices']} devices | {ms['jax']} | {tokens / r['step_s']['jax']:.0f} "
            f"| {ms['nanogpt']} | {cells[0]} | {ms['torch']} | {cells[1]} |")


def bench_ab(name: str, shape: dict[str, int], args: argparse.Namespace, option: dict[str, Any] | None = None) -> str:
    """One row of the A/B table (`worker_ab`)."""
    spec = dict(shape, steps=args.steps, warmup=args.warmup, dtype=args.dtype, remat=args.remat, option=option or {},
                devices=args.devices)
    r = run_worker("ab", spec)
    cost = r["with_s"] / r["without_s"] - 1.0
    cpu_cost = r["with_cpu_s"] / r["without_cpu_s"] - 1.0
    mib = lambda n: f"{n / 2**20:.1f}"
    return (f"| {name} | {shape['batch']} x {shape['seq']}, {r['devices']} devices | {1e3 * r['with_s']:.2f} | {1e3 * r['without_s']:.2f} "
            f"| {100 * cost:+.1f}% | {1e3 * r['with_cpu_s']:.2f} | {1e3 * r['without_cpu_s']:.2f} | {100 * cpu_cost:+.1f}% "
            f"| {mib(r['with_temp'])} | {mib(r['without_temp'])} | {r['steps_each']} |")


def transformers_step(spec: dict[str, Any]) -> tuple[Any, Any, list[float]]:
    """(model, step, losses) of transformers' `GPT2LMHeadModel` at `spec`: `step()` runs forward
    with labels, backward, `clip_grad_norm_` and `torch.optim.AdamW` on a fixed random batch
    and appends the loss to `losses`; under torch's CPU autocast to bf16 (fp32 weights and
    optimizer, the same mixed precision as gptjax's model.dtype="bfloat16") when spec asks."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=spec["vocab_size"],
        n_positions=spec["block_size"],
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_inner=spec.get("n_mlp", 0) or None,
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
    losses: list[float] = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("dtype") == "bfloat16")

    def step() -> None:
        with autocast:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))

    return model, step, losses


def worker_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel  # noqa: F401  (loaded before the memory baseline: not the step's)

    torch.set_num_threads(os.cpu_count() or 1)
    _trim()
    base_kb = _status_kb("VmRSS")
    model, step, losses = transformers_step(spec)
    return dict(_time_torch_steps(step, spec, base_kb), attn=getattr(model.config, "_attn_implementation", "?"), loss=losses[-1])


def _time_torch_steps(step: Any, spec: dict[str, Any], base_kb: int) -> dict[str, Any]:
    """Time a torch step as `worker_jax` times its step: median step time and peak memory."""
    step()  # the first step allocates the optimizer state; count it as set-up
    _trim()
    _reset_peak()
    times = _time_steps(step, max(0, spec["warmup"] - 1), spec["steps"])
    return dict(step_s=_median(times), times=times, peak_mb=(_status_kb("VmHWM") - base_kb) / 1024)


# -- the nanoGPT reference -------------------------------------------------------------------

# GPT-2's Conv1D weights are stored [in, out]; these four are torch Linears ([out, in]) in nanoGPT.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_model(spec: dict[str, Any]) -> Any:
    """A minimal PyTorch GPT-2 written as nanoGPT writes it (karpathy/nanoGPT, model.py): one
    fused qkv `Linear`, `F.scaled_dot_product_attention(is_causal=True)`, the tanh GELU,
    LayerNorms with bias, the head tied to the token embedding, nanoGPT's initialisation and
    loss. Its parameters carry GPT-2's names (`transformer.h.0.attn.c_attn.weight`, ...)."""
    import math

    import torch
    from torch import nn
    from torch.nn import functional as F

    c, h, layers, vocab = spec["n_embd"], spec["n_head"], spec["n_layer"], spec["vocab_size"]
    m, eps = spec.get("n_mlp", 0) or 4 * c, spec.get("ln_eps", 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(c, 3 * c)
            self.c_proj = nn.Linear(c, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.size()
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = nn.Linear(c, m)
            self.c_proj = nn.Linear(m, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(c, eps=eps), CausalSelfAttention()
            self.ln_2, self.mlp = nn.LayerNorm(c, eps=eps), MLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab, c),
                wpe=nn.Embedding(spec["block_size"], c),
                h=nn.ModuleList(Block() for _ in range(layers)),
                ln_f=nn.LayerNorm(c, eps=eps),
            ))
            self.lm_head = nn.Linear(c, vocab, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

        @staticmethod
        def _init_weights(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def load_gptjax_params(model: Any, params: Any, model_fields: dict[str, Any]) -> None:
    """Copy gptjax parameters into a `nanogpt_model`: as GPT-2 tensors (`gptjax.hf.params_to_hf`),
    the Conv1D weights transposed, as nanoGPT's `from_pretrained` loads GPT-2."""
    import torch

    sys.path.insert(0, REPO)
    from gptjax.hf import params_to_hf

    tensors = params_to_hf(params, model_fields)
    state = model.state_dict()
    if set(state) - {"lm_head.weight"} != set(tensors):
        raise ValueError(f"the torch model's tensors {sorted(state)} are not GPT-2's {sorted(tensors)}")
    with torch.no_grad():
        for name, value in tensors.items():
            w = torch.tensor(value)
            state[name].copy_(w.t() if name.endswith(_CONV1D) else w)


def torch_optim_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """gptjax's optimizer for `spec` (its `optim` overrides on the base config) as torch needs
    it: AdamW's hyperparameters, the global-norm clip, and the GPT-2 tensor names with weight
    decay (gptjax's per-parameter rows, mapped through `gptjax.hf.params_to_hf`). The
    learning rate is the peak one: the torch references run it constant."""
    import numpy as np

    sys.path.insert(0, REPO)
    from gptjax import config as config_lib
    from gptjax.hf import params_to_hf
    from gptjax.model import GPTConfig
    from gptjax.optim import make_optimizer
    from gptjax.state import param_shapes

    c = spec_config(spec)
    gpt = GPTConfig.from_config(c.model.to_dict())
    optimizer = make_optimizer(config_lib.sections(c).optim, param_shapes(gpt, boxed=True), c.train.steps)
    if any(not r.trainable or r.lr_mult != 1.0 for r in optimizer.describe()):
        raise ValueError("the torch references train every parameter at one learning rate")
    flags: dict[str, Any] = {}
    for r in optimizer.describe():
        *parents, leaf = r.path.split("/")
        node = flags
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.full(r.shape, float(r.weight_decay), np.float32)
    decay = sorted(name for name, x in params_to_hf(flags, dataclasses.asdict(gpt)).items() if x.any())
    o = optimizer.config
    return dict(lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip, decay=decay)


def nanogpt_step(model: Any, settings: dict[str, Any], bf16: bool) -> Any:
    """`step(inputs, targets) -> loss`: forward, backward, global-norm clip and AdamW (fused,
    weight decay on `settings["decay"]` only) as a nanoGPT training loop runs them; under
    torch's CPU autocast to bf16 when `bf16` (fp32 weights and optimizer)."""
    import torch

    decay = set(settings["decay"])
    named = list(model.named_parameters())  # a tied tensor appears once, as transformer.wte.weight
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": settings["weight_decay"]},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"], fused=True)

    def step(inputs: Any, targets: Any) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(inputs, targets)
        loss.backward()
        if settings["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _torch_batch(host: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    return (torch.from_numpy(host["inputs"].astype("int64")), torch.from_numpy(host["targets"].astype("int64")))


def nanogpt_train(spec: dict[str, Any]) -> Callable[[], float]:
    """`step() -> loss` of the nanoGPT reference at `spec` (torch seeded with 0, nanoGPT's
    initialisation), training on a fixed random batch."""
    import torch

    torch.manual_seed(0)
    model = nanogpt_model(spec)
    model.train()
    inputs, targets = _torch_batch(random_batch(spec["vocab_size"], spec["batch"], spec["seq"]))
    train_step = nanogpt_step(model, spec["torch_optim"], spec.get("dtype") == "bfloat16")
    return lambda: train_step(inputs, targets)


def worker_nanogpt(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    _trim()
    base_kb = _status_kb("VmRSS")
    train = nanogpt_train(spec)
    losses = []

    def step() -> None:
        losses.append(train())

    return dict(_time_torch_steps(step, spec, base_kb), loss=losses[-1])


def gptjax_losses(spec: dict[str, Any], steps: int) -> tuple[list[float], Any, dict[str, Any]]:
    """(losses, initial parameters on the host, model fields) of `steps` gptjax train steps at
    `spec` on one device, step s on `random_batch(..., seed=s)`. The nanoGPT reference runs a
    constant learning rate, so `spec["optim"]` must give one (schedule='constant', no warmup)."""
    import jax

    sys.path.insert(0, REPO)
    from gptjax.run import resolve

    run = resolve(spec_config(spec), None, devices=jax.devices()[:1])
    if run.optimizer.lr_at(0) != run.optimizer.lr_at(max(steps - 1, 0)):
        raise ValueError("comparing with the nanoGPT reference needs a constant learning rate "
                         "(optim schedule='constant', warmup_steps=0)")
    jitted = run.steps
    state = jitted.init_state()
    params = jax.device_get(state.params)
    losses = []
    for s in range(steps):
        host = random_batch(run.model.vocab_size, spec["batch"], spec["seq"], seed=s)
        with jitted.layout.context():
            state, metrics = jitted.train_jit(state, jitted.layout.to_global(host, accum=True))
        losses.append(float(metrics["loss"]))
    return losses, params, dataclasses.asdict(run.model)


def nanogpt_losses(spec: dict[str, Any], params: Any, model_fields: dict[str, Any], steps: int,
                   settings: dict[str, Any] | None = None) -> list[float]:
    """The nanoGPT reference's losses over the steps `gptjax_losses` ran: from `params` (gptjax's),
    on the same batches, with `settings` (default: `torch_optim_settings(spec)`)."""
    model = nanogpt_model(dict(spec, ln_eps=model_fields["ln_eps"]))
    load_gptjax_params(model, params, model_fields)
    model.train()
    step = nanogpt_step(model, settings or torch_optim_settings(spec), model_fields["dtype"] == "bfloat16")
    return [step(*_torch_batch(random_batch(model_fields["vocab_size"], spec["batch"], spec["seq"], seed=s)))
            for s in range(steps)]


def check_shape(name: str, shape: dict[str, int], args: argparse.Namespace) -> str:
    """Rows of step, gptjax loss, nanoGPT loss and their difference: both from gptjax's initial
    weights, on the same batches, at the optimizer's peak learning rate held constant."""
    spec = dict(shape, dtype=args.dtype, remat=args.remat, optim=dict(schedule="constant", warmup_steps=0))
    ours, params, fields = gptjax_losses(spec, args.check)
    theirs = nanogpt_losses(spec, params, fields, args.check)
    return "\n".join(f"| {name} | {s + 1} | {a:.6f} | {b:.6f} | {a - b:+.2e} |" for s, (a, b) in enumerate(zip(ours, theirs)))


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
    "vs nanoGPT tokens/s",
    "HF peak / peak",
)


def bench_shape(name: str, shape: dict[str, int], args: argparse.Namespace) -> list[dict[str, Any]]:
    spec = dict(
        shape,
        steps=args.steps,
        warmup=args.warmup,
        matmul_n=args.matmul_n,
        matmul_repeats=args.matmul_repeats,
        xla_options=dict(_parse_option(o) for o in args.xla_option),
        dtype=args.dtype,
        remat=args.remat,
        devices=args.devices,
    )
    kinds = ["jax"] if args.no_torch else ["jax", "torch", "nanogpt"]
    if not args.no_torch:
        spec["torch_optim"] = torch_optim_settings(spec)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        if args.parallel:  # smoke tests only: the workers disturb each other's timings
            procs = {k: start_worker(k, spec) for k in kinds}
            for k, proc in procs.items():
                runs[k].append(finish_worker(k, proc))
            continue
        for k in kinds:
            runs[k].append(run_worker(k, spec))
    tokens = shape["batch"] * shape["seq"]
    med = {k: {f: _median([r[f] for r in rs]) for f in ("step_s", "peak_mb")} for k, rs in runs.items()}
    j = {k: _median([r[k] for r in runs["jax"]]) for k in ("compile_s", "matmul_flops", "compile_mb")}
    fpt = runs["jax"][0]["flops_per_token"]
    params = _count_params(shape)
    n = runs["jax"][0]["devices"]
    frameworks = {"jax": f"gptjax (JAX, {n} device{'s' * (n > 1)})", "nanogpt": "nanoGPT (torch)"}
    if "torch" in runs:
        frameworks["torch"] = f"transformers (torch, {runs['torch'][0]['attn']})"

    def speed_vs(kind: str, reference: str) -> str:
        return f"{med[reference]['step_s'] / med[kind]['step_s']:.2f}x" if reference in med else ""

    rows = []
    for k in kinds:
        m = med[k]
        rows.append({
            "shape": name,
            "params": f"{params / 1e6:.2f}M",
            "batch x seq": f"{shape['batch']} x {shape['seq']}",
            "framework": frameworks[k],
            "compile s": f"{j['compile_s']:.1f}" if k == "jax" else "-",
            "step ms": f"{1e3 * m['step_s']:.1f}",
            "tokens/s": f"{tokens / m['step_s']:.0f}",
            "MFU": f"{100 * fpt * tokens / m['step_s'] / j['matmul_flops']:.1f}%",
            "peak MB": f"{m['peak_mb']:.0f}",
            "vs HF tokens/s": speed_vs(k, "torch"),
            "vs nanoGPT tokens/s": speed_vs(k, "nanogpt"),
            "HF peak / peak": f"{med['torch']['peak_mb'] / max(m['peak_mb'], 1e-9):.2f}x" if "torch" in med else "",
            f"_{k}_times": [r["times"] for r in runs[k]],
        })
    rows[0].update(_matmul_gflops=j["matmul_flops"] / 1e9, _compile_mb=j["compile_mb"])
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
    p.add_argument(
        "--devices",
        type=int,
        default=0,
        help="gptjax: CPU devices, data parallel (0: one per core, as python -m gptjax.train arranges them); "
        "fewer when they do not divide the batch",
    )
    p.add_argument("--no_torch", action="store_true", help="skip the torch references (transformers and nanoGPT)")
    p.add_argument(
        "--guard_ab",
        action="store_true",
        help="instead of the table: the non-finite guard's cost, the step with and without it "
        "timed in alternating blocks in one process (medians)",
    )
    p.add_argument(
        "--option_ab",
        default="",
        metavar="KEY=VALUE",
        help="instead of the table: the step compiled with and without this XLA option (added to the trainer's own), "
        "timed in alternating blocks in one process (medians), with XLA's temporary bytes of each",
    )
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of the table: STEPS train steps of gptjax and of the nanoGPT reference from the same "
        "weights on the same batches (constant peak learning rate), both losses per step",
    )
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of the table: the three steps in one process, timed in turns for ROUNDS rounds "
        "(--steps // 2 steps per block); the medians of each round's ratios (no memory figures)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny shape, 2 steps, all workers at once: a smoke test")
    p.add_argument("--json", default="", help="also write the rows (with raw step times) to this file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parallel = False

    if args.worker:
        spec = json.loads(args.spec)
        workers = {"jax": worker_jax, "torch": worker_torch, "nanogpt": worker_nanogpt, "ab": worker_ab,
                   "paired": worker_paired}
        result = workers[args.worker](spec)
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

    if args.check:
        print("| shape | step | gptjax loss | nanoGPT loss | difference |")
        print("|---|---|---|---|---|")
        for name, shape in shapes:
            print(check_shape(name, shape, args), flush=True)
        print(f"\nfrom gptjax's initial weights, random batches, {args.dtype}, the optimizer's peak learning rate held constant")
        return

    if args.paired:
        if args.no_torch:
            p.error("--paired times the torch references beside gptjax; it cannot take --no_torch")
        print("| shape | batch x seq | gptjax step ms | gptjax tokens/s | nanoGPT step ms | vs nanoGPT tokens/s "
              "(range; rounds gptjax faster) | transformers step ms | vs HF tokens/s (range; rounds gptjax faster) |")
        print("|---|---|---|---|---|---|---|---|")
        per_block = max(1, args.steps // 2)
        for name, shape in shapes:
            print(bench_paired(name, shape, args, per_block), flush=True)
        print(f"\nthe three steps in one process, in turns: each round times a block of {per_block} steps "
              f"of each (order rotating, {PAIRED_PAUSE_S} s pause before each block); step ms: medians over rounds of the "
              f"blocks' medians; ratios: medians over rounds of that round's ratio; {os.cpu_count()} CPU threads; {args.dtype}")
        return

    if args.guard_ab or args.option_ab:
        if args.option_ab and "=" not in args.option_ab:
            p.error(f"--option_ab takes KEY=VALUE, got {args.option_ab!r}")
        option = dict([_parse_option(args.option_ab)]) if args.option_ab else None
        a, b = (f"with {args.option_ab}", "without") if option else ("guard", "no guard")
        cost = "its cost" if option else "guard cost"
        print(f"| shape | batch x seq | step ms, {a} | step ms, {b} | {cost} | CPU ms, {a} | CPU ms, {b} "
              f"| {cost} (CPU) | XLA temp MiB, {a} | XLA temp MiB, {b} | steps each |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, shape in shapes:
            print(bench_ab(name, shape, args, option), flush=True)
        print(f"\nmedians over steps timed in 8 alternating blocks per variant (wall time, and the process's CPU "
              f"time, which other load on the machine disturbs less); {os.cpu_count()} CPU threads; {args.dtype}")
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
    from gptjax import runtime

    runtime.cpu_unless_accelerated()  # no TPU backend start-up where no TPU exists (as the CLIs do)
    main()
