"""The command line of `python -m gptjax.aot`: the config from a file and overrides, the check,
the table on stdout."""

from __future__ import annotations

import argparse
import sys

import jax

from gptjax import config as config_lib
from gptjax.aot.check import PROGRAMS, check
from gptjax.aot.report import format_report, format_top_ops
from gptjax.aot.topology import TOPOLOGY_EXAMPLES
from gptjax.errors import UserError, run_cli


def _compile_only_jax() -> None:
    """Hold no accelerator: the tool runs nothing, so JAX gets the CPU backend only."""
    jax.config.update("jax_platforms", "cpu")


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns 0 when the train step fits as configured, 1 when it does not."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.aot",
        description="Compile a run's steps for a TPU slice without a TPU and say whether they fit and how fast "
        "they could run. Any config field can be set with --config.section.field=value.",
    )
    parser.add_argument("--config", default="", help="a config file with get_config() (default: the built-in CPU demo)")
    parser.add_argument("--topology", required=True, help=f"the TPU slice as CHIP:SHAPE, e.g. {TOPOLOGY_EXAMPLES}")
    parser.add_argument(
        "--programs", default=",".join(PROGRAMS), help=f"which programs to compile: {', '.join(PROGRAMS)} (comma-separated)"
    )
    parser.add_argument("--sample_rows", type=int, default=8, help="the sampler's prompts per call (prefill, decode)")
    parser.add_argument("--prompt_len", type=int, default=0, help="the sampler's prompt tokens (default: half the window)")
    parser.add_argument("--no_search", action="store_true", help="do not search for a micro-batch that fits")
    parser.add_argument(
        "--layer_costs", action="store_true",
        help="with model.scan_layers, take the train and eval HLO FLOPs and HBM bytes (and so the roofline) from "
        "1- and 2-layer unrolled compiles instead of the scan's counted iterations (a cross-check); two more "
        "compiles per step",
    )
    parser.add_argument(
        "--top_ops", type=int, default=0, metavar="N",
        help="also list, per compiled program, the N ops that move the most HBM bytes, do the most FLOPs and send "
        "the most ICI bytes per call, with their share of the total",
    )
    args, rest = parser.parse_known_args(argv)

    def body() -> int:
        programs = [p.strip() for p in args.programs.split(",") if p.strip()]
        unknown = sorted(set(programs) - set(PROGRAMS))
        if unknown or not programs:
            raise UserError(f"--programs takes some of {', '.join(PROGRAMS)}, got {args.programs!r}")
        if args.top_ops < 0:
            raise UserError(f"--top_ops takes a number of ops, 0 or more, got {args.top_ops}")
        _compile_only_jax()
        config = config_lib.load_config(args.config)
        config_lib.apply_overrides(config, config_lib.parse_overrides(rest))
        report = check(
            config, args.topology, programs, search=not args.no_search, config_name=args.config,
            sample_rows=args.sample_rows, prompt_len=args.prompt_len, layer_costs=args.layer_costs,
        )
        print(format_report(report))
        if args.top_ops:
            print()
            print(format_top_ops(report, args.top_ops))
        return 0 if report.fits else 1

    return run_cli(body)
