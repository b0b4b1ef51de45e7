"""``sketchcomm bench kernels``: sketch, unsketch and top-k time of a Count Sketch against a plain
copy of the same vector, on the numpy and the compiled CPU kernel paths, as ratios measured in the
same run, and whether sketch + unsketch is within 3 copies (the target); with ``--hook-step``
also one rank's whole hook step on a 13.7M-parameter model's DDP buckets against PowerSGD rank 1
(see [`benchmarks.hook_step`][benchmarks.hook_step])."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import TYPE_CHECKING

from benchmarks.arguments import bounded_float, non_negative_int, positive_int, size

if TYPE_CHECKING:
    from benchmarks.kernels import Case


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``bench kernels``."""
    parser.add_argument(
        "--sizes",
        type=size,
        nargs="+",
        help="vector sizes (default: 1e5 1e6 1e7; with --quick: 1e5 1e6)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also size 1e8 (peak memory about (rows + 8) x 400 MB: 5.5 GB at 5 rows)",
    )
    parser.add_argument(
        "--rows", type=positive_int, nargs="+", default=[1, 3, 5], help="hash rows (default 1 3 5)"
    )
    parser.add_argument(
        "--compression",
        type=bounded_float(1.0, math.inf, open_low=True),
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
        "--repeats", type=positive_int, help="timed repeats per kernel (default 7; --quick: 3)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, help="untimed calls first (default 2; --quick: 1)"
    )
    parser.add_argument(
        "--min-time",
        type=bounded_float(0.0, 60.0, open_low=True),
        help="seconds each repeat runs at least, calling the kernel as often as needed "
        "(default 0.05; --quick: 0.005)",
    )
    parser.add_argument(
        "--topk-fraction",
        type=bounded_float(0.0, 1.0, open_low=True),
        default=0.01,
        help="k of the top-k as a fraction of the size (default 0.01)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=("numpy", "compiled"),
        help="CPU kernel paths (default: numpy, and compiled where numba is installed)",
    )
    parser.add_argument(
        "--hook-step",
        action="store_true",
        help="also the whole hook step on a 13.7M-parameter model's DDP buckets, against "
        "PowerSGD rank 1 and a copy (CPU, about a minute)",
    )
    parser.add_argument(
        "--hook-repeats", type=positive_int, default=20, help="timed hook steps (default 20)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats: a few seconds"
    )
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown table")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Run the kernel benchmark, print the Markdown table, write the requested files."""
    import torch

    from benchmarks.kernels import (
        DEFAULT_SIZES,
        LARGE_SIZE,
        markdown_table,
        plot,
        run_benchmark,
    )

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib")
    outputs = (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot))
    for option, path in outputs:
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{option} {path}: the directory does not exist")
    if args.devices is None:
        names = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    else:
        names = list(dict.fromkeys(args.devices))
    if "cuda" in names and not torch.cuda.is_available():
        raise ValueError("--devices cuda: CUDA is not available")
    if args.paths and "compiled" in args.paths and importlib.util.find_spec("numba") is None:
        raise ValueError("--paths compiled needs numba: pip install numba")
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
        paths=args.paths,
        progress=_print_progress,
    )
    table = markdown_table(report)
    if args.hook_step:
        from benchmarks.hook_step import hook_step_report, markdown_hook_table

        rows = 3 if 3 in args.rows else args.rows[0]
        report["hook_step"] = hook_step_report(
            rows=rows,
            compression=args.compression,
            repeats=args.hook_repeats,
            topk_fraction=args.topk_fraction,
        )
        table += "\n\n" + markdown_hook_table(report["hook_step"])
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return 0


def _print_progress(case: Case) -> None:
    ratios = ", ".join(f"{name} {value:.1f}x" for name, value in case.ratios.items())
    where = f"{case.device} {case.path} d={case.size} rows={case.rows}"
    print(f"{where}: {ratios}", file=sys.stderr, flush=True)
