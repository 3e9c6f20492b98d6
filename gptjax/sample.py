"""`python -m gptjax.sample`: generate text from a gptjax run or checkpoint.

    python -m gptjax.sample --workdir runs/default --prompt "def " --num_samples 3 \\
        --max_new_tokens 200 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0

Text is printed as it is generated (decoded in chunks of --chunk tokens). With several
samples the rows are decoded together, in one batch, and printed one after another, each
under its own header: the row being printed streams; when it ends (its stop token, or the
last token), the next row's text so far is printed at once and that row streams on. Rows
are not interleaved because chunks of several texts mixed on one terminal cannot be read;
they are not decoded one after another because a batch costs little more than one row.
The speed goes to stderr at the end. Row i uses the key fold_in(PRNGKey(seed), i), so the
same seed gives the same text. --max_new_tokens is not limited by the model's context
window (see `gptjax.sampling.decode` for how the context is cropped).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from typing import Any, Iterable, Iterator, TextIO

from gptjax import runtime
from gptjax.errors import UserError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptjax.sample", description="Generate text from a gptjax run.")
    p.add_argument("--workdir", required=True, help="a run directory, or one of its checkpoints/<step> directories")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the prompt text (default: empty, i.e. start of a document)")
    src.add_argument("--prompt_file", default=None, help="a file whose whole text is the prompt ('-' for stdin)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (rows decoded together)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 turns it off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 turns it off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop_tokens", default=None, help="comma-separated stop token ids (default: end of text); '' for none")
    p.add_argument("--truncate_prompt", action="store_true", help="cut a prompt longer than the context window from the left")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per call between prints")
    return p.parse_args(argv)


def print_rows(stream: Iterable[tuple[list[str], Any]], prompt: str, rows: int, out: TextIO) -> Any:
    """Print `rows` texts from `stream` one after another as they arrive; return the last result.

    One row is printed bare (the prompt, then its text); several each get a header. The row
    being printed streams; once it has ended (`result.stopped[i]` or the call finished), the
    next row's buffered text follows at once.
    """
    pending = [""] * rows
    current = 0
    result = None

    def start(i: int) -> None:
        if rows > 1:
            out.write(f"---------- sample {i} ----------\n")
        out.write(prompt)

    start(0)
    out.flush()
    for pieces, result in stream:
        for i, piece in enumerate(pieces):
            pending[i] += piece
        while True:
            out.write(pending[current])
            pending[current] = ""
            if current == rows - 1 or not (result.finished or result.stopped[current]):
                break
            out.write("\n")
            current += 1
            start(current)
        out.flush()
    out.write("\n")
    return result


@contextlib.contextmanager
def plugin_scan_narrowed() -> Iterator[None]:
    """While JAX is first imported, show `importlib.metadata.distributions()` only the
    distributions whose name starts with "jax".

    On import JAX looks for a ROCm plugin (`jax-rocm*-plugin`) by reading and parsing the
    metadata of every installed distribution (jax/_src/numpy/array_constructors.py), a
    noticeable share of a short sampling run where many are installed. The name used here comes
    from each distribution's `.dist-info` directory, without reading its metadata; one whose
    name cannot be found that way is shown as before. JAX's plugin discovery (at backend
    start, after this) sees every distribution.
    """
    import importlib.metadata

    every = importlib.metadata.distributions

    def named_jax(**kwargs: Any) -> Iterator[Any]:
        for dist in every(**kwargs):
            name = getattr(dist, "_normalized_name", None)  # private, hence the fallback
            if not isinstance(name, str) or name.startswith("jax"):
                yield dist

    importlib.metadata.distributions = named_jax
    try:
        yield
    finally:
        importlib.metadata.distributions = every


@contextlib.contextmanager
def collection_deferred() -> Iterator[None]:
    """Run the body without Python's cyclic garbage collector, then exempt what it made from
    later collections (`gc.freeze`).

    Importing JAX and loading a run create about a hundred thousand objects that all live
    until the process ends; each automatic collection on the way walks them again, which
    costs a short sampling run a noticeable share of its wall time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        import gptjax

        if args.num_samples < 1:
            raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
        if args.chunk < 1:
            raise UserError(f"--chunk must be >= 1, got {args.chunk}")
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        prompt = args.prompt or ""
        if args.prompt_file is not None:
            try:
                prompt = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
            except OSError as e:
                raise UserError(f"cannot read --prompt_file {args.prompt_file!r}: {e.strerror}") from None
        stop = None
        if args.stop_tokens is not None:
            try:
                stop = [int(t) for t in args.stop_tokens.split(",") if t.strip()]
            except ValueError:
                raise UserError(f"--stop_tokens must be comma-separated token ids, got {args.stop_tokens!r}") from None
        with collection_deferred():
            runtime.cpu_unless_accelerated()  # before JAX starts its backends
            if "jax" not in sys.modules:
                with plugin_scan_narrowed():
                    import jax  # noqa: F401
            runtime.enable_compilation_cache(store_all=True)
            model = gptjax.load(args.workdir)
        prompts = [prompt] * args.num_samples
        stream = model.stream(
            prompts,
            chunk=args.chunk,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_tokens=stop,
            truncate_prompt=args.truncate_prompt,
        )
        result = print_rows(stream, prompt, len(prompts), sys.stdout)
        decode_s = max(result.seconds - result.seconds_to_first_token, 1e-9)
        print(
            f"{result.new_tokens} new tokens in {result.seconds:.2f} s ({result.new_tokens / result.seconds:.1f} tokens/s; "
            f"first token {1e3 * result.seconds_to_first_token:.0f} ms, then "
            f"{(result.new_tokens - len(prompts)) / decode_s:.1f} tokens/s), compile time included",
            file=sys.stderr,
        )

    run_cli(body)


def exit_without_teardown() -> None:
    """End the process at once, its output flushed: the interpreter's teardown of JAX, XLA
    and tensorstore can take longer than sampling a short text from a small model, and
    nothing is left to write by then (compiled programs and caches are written synchronously)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
