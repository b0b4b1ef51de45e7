"""Benchmarks against baselines measured in the same run. Each benchmark is a module with
``configure(parser)`` and ``run(args) -> int``; see ``sketchcomm bench BENCHMARK --help``."""

from __future__ import annotations

import argparse
import sys

from sketchcomm.cli import add_subcommands

# benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("sketchcomm.bench.kernels_cli", "sketch, unsketch and top-k time against a copy"),
    "privacy": ("sketchcomm.bench.privacy", "accuracy at fixed epsilon against DP baselines"),
    "gear": ("sketchcomm.gear.cli", "GEAR KV-cache compression against its baselines"),
    "comm": ("sketchcomm.bench.comm", "wall-clock time of DDP hooks on a bandwidth-limited link"),
    "soak": ("sketchcomm.bench.soak", "memory and step time over thousands of steps"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the benchmarks as sub-commands."""
    add_subcommands(
        parser, BENCHMARKS, dest="benchmark", metavar="BENCHMARK", module_attr="_benchmark"
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; returns 0, or 2 with a message on stderr for invalid input."""
    try:
        return int(args._benchmark.run(args) or 0)
    except (OSError, ValueError) as error:
        print(f"sketchcomm bench {args.benchmark}: error: {error}", file=sys.stderr)
        return 2
