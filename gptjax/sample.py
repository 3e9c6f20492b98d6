"""`python -m gptjax.sample`: generate text from a gptjax run or checkpoint.

    python -m gptjax.sample --workdir runs/default --prompt "def " --num_samples 3 \\
        --max_new_tokens 200 --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0

Text is printed as it is generated (decoded in chunks of --chunk tokens); with several
samples or prompts each row's text is printed under its own header once the call ends, and
with a single row it streams. The speed goes to stderr at the end. Row i uses the key
fold_in(PRNGKey(seed), i), so the same seed gives the same text.
"""

from __future__ import annotations

import argparse
import sys

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
    p.add_argument("--truncate_prompt", action="store_true", help="cut a prompt too long for the context from the left")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per call between prints")
    return p.parse_args(argv)


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
        model = gptjax.load(args.workdir)
        prompts = [prompt] * args.num_samples
        controls = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_tokens=stop,
            truncate_prompt=args.truncate_prompt,
        )
        single = len(prompts) == 1
        texts = [""] * len(prompts)
        result = None
        if single:
            sys.stdout.write(prompt)
        for pieces, result in model.stream(prompts, chunk=args.chunk, **controls):
            for i, piece in enumerate(pieces):
                texts[i] += piece
            if single:
                sys.stdout.write(pieces[0])
                sys.stdout.flush()
            else:
                done = sum(len(t) for t in result.tokens)
                print(f"\r[{done} tokens]", end="", file=sys.stderr, flush=True)
        assert result is not None
        if single:
            print()
        else:
            print(file=sys.stderr)
            for i, tokens in enumerate(result.tokens):
                print(f"---------- sample {i} ----------")
                print(prompt + model.tokenizer.decode(tokens))
        decode_s = max(result.seconds - result.seconds_to_first_token, 1e-9)
        print(
            f"{result.new_tokens} new tokens in {result.seconds:.2f} s ({result.new_tokens / result.seconds:.1f} tokens/s; "
            f"first token {1e3 * result.seconds_to_first_token:.0f} ms, then "
            f"{(result.new_tokens - len(prompts)) / decode_s:.1f} tokens/s), compile time included",
            file=sys.stderr,
        )

    run_cli(body)


if __name__ == "__main__":
    main()
