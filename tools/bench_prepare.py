"""Data preparation speed: a corpus tokenized on 1 core and on 2 cores, and what that projects.

    python tools/bench_prepare.py                       # 256 MB of parquet, cores 1 and 2, 3 repeats
    python tools/bench_prepare.py --mb 16 --repeats 1   # a quick check
    python tools/bench_prepare.py --tokenizer data/gpt2/tokenizer.json   # GPT-2's BPE instead

It makes a corpus (once, in --dir) of --mb megabytes of the running Python's standard library
source cut into documents of 1-8 kB, as parquet shards of 64 MB like FineWeb-Edu's (or .jsonl
with --format jsonl). The tokenizer is --tokenizer, or a SentencePiece bpe model of 2,048 pieces
(the default config's) trained on 2M characters of the corpus; training it is not timed. Then,
for each --cores count, a fresh process pinned with `taskset -c 0..N-1` prepares the corpus as a
run does: resolve the source (file checks, row-group plan), read, parse and encode every
document on as many worker processes as it may use cores, merge the parts and write the token
cache (timed from resolve to the finished cache). It prints characters/s per core count (the
median of --repeats), the speed-up, and a projection for FineWeb-Edu's 10B-token sample (about
--target_gb GB of text) on a TPU slice of --hosts hosts with --host_cores cores each (a v5e-16
slice: 4 hosts of 112 vCPUs), from the 1-core rate and the 2-core parallel efficiency. vCPUs
are hyperthreads: the projection is an upper bound where two share a core.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

SHARD_BYTES = 64 << 20
ROW_GROUP_ROWS = 2048


def make_corpus(directory: str, megabytes: float, fmt: str) -> str:
    """--mb MB of documents (stdlib source text, numbered so no two are equal) in shards; reused when present."""
    from gptjax.data import stdlib_files

    tag = os.path.join(directory, f"corpus-{fmt}-{megabytes:g}MB")
    if os.path.exists(os.path.join(tag, "done")):
        return tag
    shutil.rmtree(tag, ignore_errors=True)
    os.makedirs(tag)
    pieces, size = [], 0
    for path in stdlib_files():  # as much standard-library text as the corpus needs, up to all of it
        with open(path, encoding="utf-8", errors="replace") as f:
            pieces.append(f.read())
        size += len(pieces[-1])
        if size > 2 * megabytes * 1e6:
            break
    text = "".join(pieces)
    rng, target, made, shard, pos = random.Random(0), int(megabytes * 1e6), 0, 0, 0
    while made < target:
        rows, size = [], 0
        while size < min(SHARD_BYTES, target - made):
            n = rng.randint(1000, 8000)
            if pos + n > len(text):
                pos = 0
            rows.append(f"Document {made + size}.\n{text[pos:pos + n]}")
            pos += n
            size += len(rows[-1])
        _write_shard(os.path.join(tag, f"{shard:05d}"), rows, fmt)
        made, shard = made + size, shard + 1
    open(os.path.join(tag, "done"), "w").close()
    return tag


def _write_shard(stem: str, rows: list[str], fmt: str) -> None:
    if fmt == "jsonl":
        with open(stem + ".jsonl", "w") as f:
            f.writelines(json.dumps({"text": r}) + "\n" for r in rows)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), stem + ".parquet", row_group_size=ROW_GROUP_ROWS)


def tokenizer_dir(directory: str, corpus: str, given: str, vocab: int) -> str:
    """A saved tokenizer to encode with: --tokenizer's, or a SentencePiece model of `vocab` pieces."""
    from gptjax import tokenizer as tk

    out = os.path.join(directory, "tokenizer-given" if given else f"tokenizer-spm{vocab}")  # reused when present
    if not tk.tokenizer_saved(out):
        tok = tk.load_given(given) if given else None
        if tok is None:
            from gptjax.data import DataConfig, parse_source
            from gptjax.data.sources import resolve

            source = resolve(parse_source(f"files:{corpus}/*")[0], DataConfig())
            tok = tk.train_sentencepiece(source.training_texts(), out + ".tmp", vocab, max_chars=2_000_000)
            shutil.rmtree(out + ".tmp")
        tok.save(out)
    return out


def measure(corpus: str, tokenizer: str) -> dict:
    """Prepare the corpus once into a fresh cache (this process's cores); characters and seconds."""
    from gptjax.data import DataConfig, Progress, parse_source
    from gptjax.data.cache import token_streams
    from gptjax.data.hosts import Hosts
    from gptjax.data.sources import resolve
    from gptjax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    cache = tempfile.mkdtemp(prefix="bench-prepare-", dir=os.path.dirname(corpus))
    try:
        start = time.perf_counter()
        source = resolve(parse_source(f"files:{corpus}/*")[0], DataConfig())
        token_streams(source, tok, cache, Progress(False), Hosts(0, 1, 600.0, os.path.join(cache, "status")))
        seconds = time.perf_counter() - start
        (meta,) = glob.glob(os.path.join(cache, "*", "meta.json"))
        with open(meta) as f:
            counts = json.load(f)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"characters": counts["characters"], "tokens": counts["train"]["tokens"] + counts["val"]["tokens"],
            "seconds": seconds, "cores": len(os.sched_getaffinity(0))}


def run_pinned(cores: int, corpus: str, tokenizer: str) -> dict:
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    cmd = ["taskset", "-c", cpus, sys.executable, os.path.abspath(__file__), "--_measure", corpus, "--tokenizer_dir",
           tokenizer]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=256, help="corpus size in MB of text (default 256)")
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet")
    p.add_argument("--cores", default="1,2", help="core counts to pin to, comma-separated (default 1,2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "gptjax-bench-prepare"))
    p.add_argument("--tokenizer", default="", help="a tokenizer.json / SentencePiece .model (default: SPM 2,048)")
    p.add_argument("--vocab", type=int, default=2048, help="pieces of the SentencePiece model trained (default 2048)")
    p.add_argument("--hosts", type=int, default=4, help="hosts of the projected slice (v5e-16: 4)")
    p.add_argument("--host_cores", type=int, default=112, help="cores (vCPUs) per host (v5e: 112)")
    p.add_argument("--target_gb", type=float, default=45.0, help="text to project for, in GB (FineWeb-Edu 10BT: ~45)")
    p.add_argument("--_measure", default="", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer_dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(args._measure, args.tokenizer_dir)))
        return
    cores = [int(c) for c in args.cores.split(",")]
    if max(cores) > len(os.sched_getaffinity(0)):
        sys.exit(f"error: --cores {args.cores}: this process may use only {len(os.sched_getaffinity(0))} cores")
    os.makedirs(args.dir, exist_ok=True)
    corpus = make_corpus(args.dir, args.mb, args.format)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(corpus, "*.*")))
    tokenizer = tokenizer_dir(args.dir, corpus, args.tokenizer, args.vocab)
    print(f"corpus: {corpus} ({size / 1e6:.0f} MB of {args.format}); tokenizer: {tokenizer}")
    rates = {}
    for n in cores:
        runs = [run_pinned(n, corpus, tokenizer) for _ in range(args.repeats)]
        seconds = statistics.median(r["seconds"] for r in runs)
        rates[n] = runs[0]["characters"] / seconds
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        print(f"{n} core(s): {runs[0]['characters'] / 1e6:.0f}M characters, {runs[0]['tokens'] / 1e6:.1f}M tokens "
              f"in {seconds:.1f} s (median of {len(runs)}: {each}) = "
              f"{rates[n] / 1e6:.2f}M characters/s")
    if 1 in rates and 2 in rates:
        speedup = rates[2] / rates[1]
        efficiency = min(1.0, speedup / 2)
        total = args.hosts * args.host_cores
        seconds = args.target_gb * 1e9 / (rates[1] * efficiency * total)
        print(f"speed-up 1 -> 2 cores: {speedup:.2f}x (target >= 1.8x)")
        print(f"projection: {args.target_gb:g} GB of text on {args.hosts} hosts x {args.host_cores} cores at "
              f"{rates[1] / 1e6:.2f}M characters/s per core x {efficiency:.2f} efficiency = {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
