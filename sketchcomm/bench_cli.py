"""Benchmarks against baselines measured in the same run, from a source checkout.

The benchmarks are not part of the installed package: they live in the ``benchmarks/`` folder of
the source repository, with their own tests. From a checkout (the current folder, or the one
this package was imported from), ``sketchcomm bench BENCHMARK ...`` runs
``python -m benchmarks BENCHMARK ...``; ``sketchcomm bench BENCHMARK --help`` lists a benchmark's
options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

MISSING = (
    "the benchmarks are not installed with the package: they live in the benchmarks/ folder of "
    "the source repository. Clone it and run, from the checkout, "
    "`python -m benchmarks BENCHMARK ...` (or `sketchcomm bench BENCHMARK ...` there)"
)


def find_checkout() -> Path | None:
    """The folder holding ``benchmarks/``: the current folder, or the checkout this package was
    imported from (an editable install or ``PYTHONPATH``); ``None`` for an installed wheel."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "benchmarks" / "cli.py").is_file():
            return root
    return None


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the benchmark's name and pass every later argument on to it."""
    root = find_checkout()
    listing = "see `python -m benchmarks --help` in a source checkout"
    if root is not None:
        benchmarks = _import_benchmarks(root)
        listing = ", ".join(f"{name} ({help_text})" for name, (_, help_text) in benchmarks.items())
    parser.add_argument("benchmark", metavar="BENCHMARK", help=f"one of: {listing}")
    parser.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="the benchmark's options (sketchcomm bench BENCHMARK --help)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark of the checkout; 2 with the remedy on stderr when there is none."""
    root = find_checkout()
    if root is None:
        print(f"sketchcomm bench: {MISSING}", file=sys.stderr)
        return 2
    _import_benchmarks(root)
    cli = importlib.import_module("benchmarks.cli")
    return cli.main([args.benchmark, *args.options], prog="sketchcomm bench")


def _import_benchmarks(root: Path) -> dict[str, tuple[str, str]]:
    """Put ``root`` first on ``sys.path`` and return the checkout's benchmark registry."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    cli = importlib.import_module("benchmarks.cli")
    if Path(cli.__file__).resolve().parent != root / "benchmarks":
        raise ImportError(
            f"another 'benchmarks' package ({cli.__file__}) shadows {root / 'benchmarks'}: "
            "run from the checkout with that package's folder off sys.path"
        )
    return cli.BENCHMARKS
