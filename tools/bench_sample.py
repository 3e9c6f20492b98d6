"""Sampling speed: gptjax's decoder against transformers' generate and the memory-bandwidth bound.

    python tools/bench_sample.py                      # default model and GPT-2 124M, batch 1/8/32
    python tools/bench_sample.py --shapes 124m --batches 1 --repeats 5
    python tools/bench_sample.py --shapes default --new 512 --no_hf   # past the 128-token window
    python tools/bench_sample.py --shapes 124m --batches 1,8 --kv_heads 0,4,1 --no_hf  # grouped-query

For each model shape (random weights) and batch size it measures, in the same run:

- gptjax: new tokens/s over a whole call (prefill included), time to first token (prefill and
  the first choice), and the compile time of a first call, reported separately;
- Hugging Face `GPT2LMHeadModel.generate` on PyTorch CPU with the same weights and settings
  (do_sample=True, top_k, top_p, KV cache on), new tokens/s and time to first token, with
  the better of 1 thread and one per core;
- the bandwidth bound: bytes one decode step must read (every weight once, the output
  embedding included, plus the keys and values of the context so far, averaged over the
  call), divided by the read bandwidth measured here with a large fp32 reduction; as tokens/s
  it is batch / (bytes / bandwidth).

With --new past the window (prompt + new > block_size) the decoder crops and re-prefills
(see `gptjax.sampling.decode`); the bound then counts the context the cropping rule gives.

--kv_heads runs each shape again with that many key/value heads (`model.n_kv_head`; 0 is the
shape's own, all heads), rows named `shape/kvN`: the KV cache holds only those heads, and the
last column, the mean KV cache bytes a decode step reads, falls with them. transformers'
GPT-2 has no grouped-query attention, so those rows have no HF columns.

Every figure is the median of --repeats runs after a warm-up; it prints a table with ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.model import GPTConfig, init_params  # noqa: E402
from gptjax.sampling import Decoder, keep_length  # noqa: E402

SHAPES = {
    # configs/default.py: 4 x 128, block 128, a 2048-token SentencePiece vocabulary.
    "default": dict(cfg=GPTConfig(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=128), prompt=16, new=64),
    "124m": dict(cfg=GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024), prompt=16, new=64),
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: the best of a jitted JAX sum and a multi-threaded torch sum
    over a 1 GiB fp32 array (read-only, like the weights in a decode step)."""
    import torch

    x = jnp.ones((256, 1024 * 1024), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    t_jax = median_time(lambda: f(x).block_until_ready(), repeats)
    del x
    y = torch.ones(256, 1024 * 1024)
    y.sum()
    t_torch = median_time(lambda: y.sum(), repeats)
    return 256 * 1024 * 1024 * 4 / min(t_jax, t_torch)


def mean_context(cfg: GPTConfig, prompt: int, new: int) -> float:
    """The mean number of tokens a step attends over, by the decoder's cropping rule."""
    total, c = 0, prompt
    for _ in range(new):
        total += c
        c = c + 1 if c + 1 <= cfg.block_size else keep_length(cfg.block_size)
    return total / new


def kv_bytes(cfg: GPTConfig, batch: int, prompt: int, new: int) -> float:
    """The KV cache bytes a decode step reads on average: keys and values of the context, kv heads only."""
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize
    return batch * cfg.n_layer * 2 * mean_context(cfg, prompt, new) * cfg.kv_heads * cfg.head_dim * itemsize


def step_bytes(cfg: GPTConfig, batch: int, prompt: int, new: int) -> float:
    """Bytes a decode step must read: all weights but the position table, plus the average KV context."""
    table = cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0
    return (cfg.num_params() - table) * 4 + kv_bytes(cfg, batch, prompt, new)


def hf_model(cfg: GPTConfig, params):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.mlp_dim, layer_norm_epsilon=cfg.ln_eps, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    ).eval()
    p = jax.tree_util.tree_map(np.asarray, params)
    sd = {"transformer.wte.weight": p["wte"]["embedding"], "transformer.wpe.weight": p["wpe"]["embedding"],
          "transformer.ln_f.weight": p["ln_f"]["scale"], "transformer.ln_f.bias": p["ln_f"]["bias"]}
    c = cfg.n_embd
    for i in range(cfg.n_layer):
        b, h = p[f"h_{i}"], f"transformer.h.{i}."
        sd[h + "ln_1.weight"], sd[h + "ln_1.bias"] = b["ln_1"]["scale"], b["ln_1"]["bias"]
        sd[h + "ln_2.weight"], sd[h + "ln_2.bias"] = b["ln_2"]["scale"], b["ln_2"]["bias"]
        sd[h + "attn.c_attn.weight"] = b["attn"]["c_attn"]["kernel"].reshape(c, 3 * c)
        sd[h + "attn.c_attn.bias"] = b["attn"]["c_attn"]["bias"].reshape(3 * c)
        sd[h + "attn.c_proj.weight"] = b["attn"]["c_proj"]["kernel"].reshape(c, c)
        sd[h + "attn.c_proj.bias"] = b["attn"]["c_proj"]["bias"]
        sd[h + "mlp.c_fc.weight"], sd[h + "mlp.c_fc.bias"] = b["mlp"]["c_fc"]["kernel"], b["mlp"]["c_fc"]["bias"]
        sd[h + "mlp.c_proj.weight"], sd[h + "mlp.c_proj.bias"] = b["mlp"]["c_proj"]["kernel"], b["mlp"]["c_proj"]["bias"]
    sd = {k: torch.tensor(np.array(v)) for k, v in sd.items()}
    hf.load_state_dict(sd, strict=False)
    hf.tie_weights()
    return hf


def bench_hf(hf, prompts: np.ndarray, new: int, top_k: int, top_p: float, repeats: int) -> tuple[float, float]:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=1.0, use_cache=True, pad_token_id=0,
              eos_token_id=None, attention_mask=torch.ones_like(ids))

    def run(n: int) -> None:
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == ids.shape[1] + n

    # Warm up, and give transformers its better thread count: on a busy 2-core machine one
    # thread is often faster than two.
    best = None
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        run(new)
        t = median_time(lambda: run(new), 2)
        if best is None or t < best[0]:
            best = (t, threads)
    torch.set_num_threads(best[1])
    total = median_time(lambda: run(new), repeats)
    ttft = median_time(lambda: run(1), repeats)
    return prompts.shape[0] * new / total, ttft


def bench_ours(cfg: GPTConfig, params, prompts: np.ndarray, new: int, top_k: int, top_p: float, repeats: int) -> tuple[float, float, float]:
    decoder = Decoder(cfg, params)
    kw = dict(max_new_tokens=new, temperature=1.0, top_k=top_k, top_p=top_p, stop_tokens=(), seed=0)
    rows = [list(r) for r in prompts]
    t = time.perf_counter()
    decoder.generate_tokens(rows, **kw)
    first = time.perf_counter() - t
    results = []

    def run() -> None:
        results.append(decoder.generate_tokens(rows, **kw))
        assert all(len(r) == new for r in results[-1].tokens)

    total = median_time(run, repeats)
    ttft = statistics.median(r.seconds_to_first_token for r in results)
    return prompts.shape[0] * new / total, ttft, max(first - total, 0.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="default,124m", help="comma-separated: default, 124m")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--top_k", type=int, default=50)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=0, help="new tokens per row (default: the shape's, 64)")
    ap.add_argument("--no_hf", action="store_true", help="skip the transformers reference")
    ap.add_argument("--kv_heads", default="0", help="comma-separated model.n_kv_head values (0: all heads)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = measure_bandwidth()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}")
    print(f"sampling: temperature 1.0, top_k {args.top_k}, top_p {args.top_p}; random weights; median of {args.repeats}")
    header = (f"{'shape':11} {'batch':>5} {'prompt':>6} {'new':>4} | {'ours tok/s':>10} {'ttft ms':>8} {'compile s':>9} | "
              f"{'HF tok/s':>9} {'HF ttft':>8} {'x HF':>6} | {'bound tok/s':>11} {'% bound':>7} | {'KV MB/step':>10}")
    print(header)
    print("-" * len(header))
    runs = [(name, int(kv)) for name in args.shapes.split(",") for kv in args.kv_heads.split(",")]
    for name, kv_heads in runs:
        spec = SHAPES[name]
        cfg, prompt, new = spec["cfg"], spec["prompt"], args.new or spec["new"]
        if kv_heads:
            cfg = dataclasses.replace(cfg, n_kv_head=kv_heads)
            name = f"{name}/kv{kv_heads}"
        params = init_params(cfg, jax.random.PRNGKey(0))
        hf = None if args.no_hf or kv_heads else hf_model(cfg, params)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, prompt))
            ours, ttft, compile_s = bench_ours(cfg, params, prompts, new, args.top_k, args.top_p, args.repeats)
            bound = batch / (step_bytes(cfg, batch, prompt, new) / bandwidth)
            if hf is not None:
                hf_tps, hf_ttft = bench_hf(hf, prompts, new, args.top_k, args.top_p, args.repeats)
                hf_cols = f"{hf_tps:9.1f} {hf_ttft * 1e3:8.1f} {ours / hf_tps:6.2f}"
            else:
                hf_cols = f"{'-':>9} {'-':>8} {'-':>6}"
            print(f"{name:11} {batch:5d} {prompt:6d} {new:4d} | {ours:10.1f} {ttft * 1e3:8.1f} {compile_s:9.2f} | "
                  f"{hf_cols} | {bound:11.1f} {100 * ours / bound:6.0f}% | "
                  f"{kv_bytes(cfg, batch, prompt, new) / 1e6:10.2f}", flush=True)


if __name__ == "__main__":
    from gptjax import runtime

    runtime.cpu_unless_accelerated()  # no TPU backend start-up where no TPU exists (as the CLIs do)
    main()
