"""Benchmarks. ``kernels``: sketch, unsketch and top-k time of a Count Sketch against a plain copy
of the same vector, as ratios measured in the same run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sketchcomm.bench.kernels import Case


def _size(text: str) -> int:
    """A vector size such as ``100000`` or ``1e5``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"a size must be a positive integer, got {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _bounded_float(low: float, high: float, *, open_low: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        above = value > low if open_low else value >= low
        if not (math.isfinite(value) and above and value <= high):
            bracket = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low:g}, {high:g}], got {text}")
        return value

    return parse


def _configure_kernels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        help="vector sizes (default: 1e5 1e6 1e7; with --quick: 1e5 1e6)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also size 1e8 (peak memory about (rows + 8) x 400 MB: 5.5 GB at 5 rows)",
    )
    parser.add_argument(
        "--rows", type=_positive_int, nargs="+", default=[1, 3, 5], help="hash rows (default 1 3 5)"
    )
    parser.add_argument(
        "--compression",
        type=_bounded_float(1.0, math.inf, open_low=True),
        default=20.0,
        help="vector elements per table element; columns = prime_at_most(d // (compression * "
        "rows)) (default 20)",
    )
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=("cpu", "cuda"),
        help="devices to measure (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--repeats", type=_positive_int, help="timed repeats per kernel (default 7; --quick: 3)"
    )
    parser.add_argument(
        "--warmup", type=_non_negative_int, help="untimed calls first (default 2; --quick: 1)"
    )
    parser.add_argument(
        "--min-time",
        type=_bounded_float(0.0, 60.0, open_low=True),
        help="seconds each repeat runs at least, calling the kernel as often as needed "
        "(default 0.05; --quick: 0.005)",
    )
    parser.add_argument(
        "--topk-fraction",
        type=_bounded_float(0.0, 1.0, open_low=True),
        default=0.01,
        help="k of the top-k as a fraction of the size (default 0.01)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats: a few seconds"
    )
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the benchmarks as sub-commands."""
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benchmarks.required = True
    kernels = benchmarks.add_parser(
        "kernels",
        help="sketch, unsketch and top-k time against a plain copy",
        description="Time CountSketch.sketch, CountSketch.estimate (with its per-row gathers "
        "alone) and the top-k selection against dst.copy_(src) of the same vector, as ratios "
        "measured in the same run; prints a Markdown table.",
    )
    _configure_kernels(kernels)


def _run_kernels(args: argparse.Namespace) -> int:
    import torch

    from sketchcomm.bench.kernels import (
        DEFAULT_SIZES,
        LARGE_SIZE,
        markdown_table,
        plot,
        run_benchmark,
    )

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{option} {path}: the directory does not exist")
    if args.devices is None:
        names = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    else:
        names = list(dict.fromkeys(args.devices))
    if "cuda" in names and not torch.cuda.is_available():
        raise ValueError("--devices cuda: CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    sizes = list(dict.fromkeys(args.sizes or (DEFAULT_SIZES[:2] if quick else DEFAULT_SIZES)))
    if args.large and LARGE_SIZE not in sizes:
        sizes.append(LARGE_SIZE)
    report = run_benchmark(
        sizes=sizes,
        rows=list(dict.fromkeys(args.rows)),
        compression=args.compression,
        devices=[torch.device(name) for name in names],
        repeats=args.repeats or (3 if quick else 7),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        min_time=args.min_time or (0.005 if quick else 0.05),
        topk_fraction=args.topk_fraction,
        progress=_print_progress,
    )
    print(markdown_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0


def _print_progress(case: Case) -> None:
    ratios = ", ".join(f"{name} {value:.1f}x" for name, value in case.ratios.items())
    print(f"{case.device} d={case.size} rows={case.rows}: {ratios}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; returns 0, or 2 with a message on stderr for invalid input."""
    handlers = {"kernels": _run_kernels}
    try:
        return handlers[args.benchmark](args)
    except (OSError, ValueError) as error:
        print(f"sketchcomm bench {args.benchmark}: error: {error}", file=sys.stderr)
        return 2
