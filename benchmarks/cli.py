"""Benchmarks against baselines measured in the same run: ``python -m benchmarks BENCHMARK``
from the repository's root (or ``sketchcomm bench BENCHMARK``). Each benchmark is a module with
``configure(parser)`` and ``run(args) -> int``; see ``python -m benchmarks BENCHMARK --help``."""

from __future__ import annotations

import argparse
import sys

from sketchcomm.cli import add_subcommands

# benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "kernels": ("benchmarks.kernels_cli", "sketch, unsketch and top-k time against a copy"),
    "privacy": ("benchmarks.privacy", "accuracy at fixed epsilon against DP baselines"),
    "gear": ("benchmarks.gear", "GEAR KV-cache compression against its baselines"),
    "comm": ("benchmarks.comm", "wall-clock time of DDP hooks on a bandwidth-limited link"),
    "soak": ("benchmarks.soak", "memory and step time over thousands of steps"),
    "private-models": (
        "benchmarks.private_models",
        "private GPT-2 and CNN training against Opacus and allreduce",
    ),
}


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    """One sub-command per benchmark of :data:`BENCHMARKS`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_subcommands(
        parser, BENCHMARKS, dest="benchmark", metavar="BENCHMARK", module_attr="benchmark_module"
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    """Run the chosen benchmark; returns 0, or 2 with a message on stderr for invalid input."""
    args = build_parser(prog).parse_args(argv)
    benchmark = vars(args).pop("benchmark_module")
    try:
        return int(benchmark.run(args) or 0)
    except (OSError, ValueError) as error:
        print(f"{prog} {args.benchmark}: error: {error}", file=sys.stderr)
        return 2
