"""Time of the Triton Count Sketch kernels on a CUDA device, as multiples of a plain copy.

For each vector size ``d`` and number of rows ``r``, a :class:`CountSketch` with
``c = prime_at_most(d // (compression * r))`` columns is built on the device (as
:class:`sketchcomm.SketchState` builds for a bucket) and these are timed on one random fp32 vector,
each divided by the time of ``copy`` measured in the same run:

* ``copy``: ``dst.copy_(x)`` into a preallocated ``d``-element vector, the unit;
* ``sketch``: :func:`sketchcomm.sketch_triton.sketch_into` into a zeroed table (row-parallel,
  equal to the CPU's tables), ``sketch_atomic`` the same with ``deterministic=False``;
* ``estimate``: :func:`sketchcomm.sketch_triton.estimate_into` into a preallocated vector;
* ``heavy_hitters``: :func:`sketchcomm.sketch_triton.heavy_hitters` with
  ``k = ceil(topk_fraction * d)``;
* ``torch_sketch`` and ``torch_estimate``: :meth:`CountSketch.sketch` and
  :meth:`CountSketch.estimate` (``out=``), the pure-torch path (a kernel per chunk and row), for
  the before/after comparison.

Times come from CUDA events around ``calls`` back-to-back calls (enough for ``min_time``
seconds), the median over ``repeats`` interleaved repeats. With ``TRITON_INTERPRET=1`` the same
code runs on the CPU (``--device cpu``, wall-clock timing) so that it is known to work without a
GPU; those numbers measure the interpreter, not the kernels. Every case also records whether the
Triton tables and estimate equal the CPU's.

Run on a GPU machine from the repository's root::

    python -m benchmarks.kernels_cuda --sizes 1e5 1e6 1e7 1e8 --rows 3 5 --json cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.arguments import bounded_float, non_negative_int, positive_int, size
from benchmarks.kernels import sketch_columns
from sketchcomm import sketch_triton
from sketchcomm.sketch import CountSketch

__all__ = [
    "KERNELS",
    "CudaCase",
    "configure",
    "main",
    "markdown_table",
    "measure_case",
    "run",
    "run_benchmark",
]

KERNELS = (
    "sketch",
    "sketch_atomic",
    "estimate",
    "heavy_hitters",
    "torch_sketch",
    "torch_estimate",
)


@dataclass
class CudaCase:
    """Median seconds per call of ``copy`` and of every kernel in :data:`KERNELS`."""

    device: str
    size: int
    rows: int
    columns: int
    k: int
    seconds: dict[str, float]
    tables_equal: bool
    estimate_equal: bool

    @property
    def ratios(self) -> dict[str, float]:
        """Each kernel's time over the copy's, and the round trips ``sketch+estimate`` (Triton)
        and ``torch_sketch+estimate`` (pure torch)."""
        copy = self.seconds["copy"]
        ratios = {name: self.seconds[name] / copy for name in KERNELS}
        ratios["sketch+estimate"] = ratios["sketch"] + ratios["estimate"]
        ratios["torch_sketch+estimate"] = ratios["torch_sketch"] + ratios["torch_estimate"]
        return ratios

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios}


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of ``fn`` over ``calls`` calls: CUDA events on a GPU, else wall clock."""
    if device.type == "cuda":

        def timed(fn: Callable[[], object], calls: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls

        return timed

    def wall(fn: Callable[[], object], calls: int) -> float:
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls

    return wall


def measure_case(
    size: int,
    rows: int,
    compression: float,
    device: torch.device,
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.02,
    topk_fraction: float = 0.01,
    seed: int = 0,
) -> CudaCase:
    """Time ``copy`` and the :data:`KERNELS` for one size and number of rows on ``device``."""
    columns = sketch_columns(size, rows, compression)
    sketch = CountSketch(size, rows, columns, seed=seed, device=device)
    cpu_sketch = CountSketch(size, rows, columns, seed=seed)
    x_cpu = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    x = x_cpu.to(device)
    dst = torch.empty_like(x)
    tables = torch.zeros(1, rows, columns, device=device)
    table = sketch_triton.sketch_into(sketch, x[None], tables.clone())[0]
    cpu_table = cpu_sketch.sketch(x_cpu)
    tables_equal = torch.equal(table.cpu(), cpu_table)
    estimate_equal = torch.equal(
        sketch_triton.estimate_into(sketch, table, dst).cpu(), cpu_sketch.estimate(cpu_table)
    )
    k = max(1, math.ceil(topk_fraction * size))
    kernels: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(x),
        "sketch": lambda: sketch_triton.sketch_into(sketch, x[None], tables.zero_()),
        "sketch_atomic": lambda: sketch_triton.sketch_into(
            sketch, x[None], tables.zero_(), deterministic=False
        ),
        "estimate": lambda: sketch_triton.estimate_into(sketch, table, dst),
        "heavy_hitters": lambda: sketch_triton.heavy_hitters(sketch, table, k),
        "torch_sketch": lambda: sketch.sketch(x, out=tables[0].zero_()),
        "torch_estimate": lambda: sketch.estimate(table, out=dst),
    }
    timed = _timer(device)
    calls = {}
    for name, fn in kernels.items():
        for _ in range(warmup):
            fn()
        calls[name] = max(1, math.ceil(min_time / timed(fn, 1)))
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, fn in kernels.items():
            samples[name].append(timed(fn, calls[name]))
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    return CudaCase(str(device), size, rows, columns, k, seconds, tables_equal, estimate_equal)


def run_benchmark(
    sizes: Sequence[int],
    rows: Sequence[int],
    compression: float,
    device: torch.device,
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.02,
    topk_fraction: float = 0.01,
    progress: Callable[[CudaCase], None] | None = None,
) -> dict[str, Any]:
    """Every combination of size and rows on ``device``; a JSON-ready report. Every setting is
    checked before the first measurement."""
    for n in sizes:
        for r in rows:
            sketch_columns(n, r, compression)
    cases = []
    for n in sizes:
        for r in rows:
            case = measure_case(
                n,
                r,
                compression,
                device,
                repeats=repeats,
                warmup=warmup,
                min_time=min_time,
                topk_fraction=topk_fraction,
            )
            cases.append(case)
            if progress is not None:
                progress(case)
    environment = {"torch": torch.__version__, "triton": _triton_version()}
    if device.type == "cuda":
        environment["gpu"] = torch.cuda.get_device_name(device)
    return {
        "benchmark": "kernels_cuda",
        "config": {
            "sizes": list(sizes),
            "rows": list(rows),
            "compression": compression,
            "device": str(device),
            "repeats": repeats,
            "warmup": warmup,
            "min_time": min_time,
            "topk_fraction": topk_fraction,
        },
        "environment": environment,
        "cases": [case.as_dict() for case in cases],
    }


def _triton_version() -> str:
    import triton

    return triton.__version__


def markdown_table(report: dict[str, Any]) -> str:
    """The cases of a :func:`run_benchmark` report as a Markdown table of ratios to the copy."""
    columns = ("sketch", "sketch_atomic", "estimate", "sketch+estimate", "heavy_hitters")
    header = ["d", "rows", "copy (µs)", *columns, "torch_sketch+estimate", "equal to CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in report["cases"]:
        ratios = case["ratios"]
        cells = [
            f"{case['size']:.0e}",
            str(case["rows"]),
            f"{case['seconds']['copy'] * 1e6:.1f}",
            *(f"{ratios[name]:.1f}x" for name in columns),
            f"{ratios['torch_sketch+estimate']:.1f}x",
            "yes" if case["tables_equal"] and case["estimate_equal"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the benchmark."""
    parser.add_argument("--sizes", type=size, nargs="+", default=[10**5, 10**6, 10**7, 10**8])
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[3, 5])
    parser.add_argument(
        "--compression", type=bounded_float(1.0, math.inf, open_low=True), default=20.0
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu only under TRITON_INTERPRET=1 (checks that the code runs; no kernel timing)",
    )
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--min-time", type=bounded_float(0.0, 60.0, open_low=False), default=0.02)
    parser.add_argument(
        "--topk-fraction", type=bounded_float(0.0, 1.0, open_low=True), default=0.01
    )
    parser.add_argument("--json", help="write the report to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON report; 2 with a message when the device or
    Triton is missing."""
    if args.device == "cuda" and not torch.cuda.is_available():
        message = "no CUDA device: run on a GPU machine (or --device cpu under TRITON_INTERPRET=1)"
        print(message, file=sys.stderr)
        return 2
    if not sketch_triton.triton_available():
        print("Triton is missing: pip install 'sketchcomm[cuda]'", file=sys.stderr)
        return 2
    report = run_benchmark(
        args.sizes,
        args.rows,
        args.compression,
        torch.device(args.device),
        repeats=args.repeats,
        warmup=args.warmup,
        min_time=args.min_time,
        topk_fraction=args.topk_fraction,
        progress=lambda case: print(f"d={case.size} rows={case.rows} done", file=sys.stderr),
    )
    print(markdown_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels_cuda", description=__doc__)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
