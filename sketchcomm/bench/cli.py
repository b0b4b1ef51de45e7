"""Benchmarks against baselines measured in the same run. Each benchmark is a module with
``configure(parser)`` and ``run(args) -> int``; see ``sketchcomm bench BENCHMARK --help``."""

from __future__ import annotations

import argparse
import importlib
import sys

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
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benchmarks.required = True
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        command = benchmarks.add_parser(name, help=help_text, description=module.__doc__)
        module.configure(command)
        command.set_defaults(_benchmark=module)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; returns 0, or 2 with a message on stderr for invalid input."""
    try:
        return int(args._benchmark.run(args) or 0)
    except (OSError, ValueError) as error:
        print(f"sketchcomm bench {args.benchmark}: error: {error}", file=sys.stderr)
        return 2
