"""Time of the Count Sketch kernels relative to a plain copy of the same vector.

For each device, vector size ``d`` and number of rows ``r``, a :class:`CountSketch` with
``c = prime_at_most(d // (compression * r))`` columns is built (a table of about
``d / compression`` elements, as :class:`sketchcomm.SketchState` builds for a bucket), and these
kernels are timed on one random fp32 vector:

* ``copy``: ``dst.copy_(src)`` into a preallocated vector of ``d`` elements, the reference;
* ``sketch``: :meth:`CountSketch.sketch` of the vector into a new table;
* ``unsketch``: :meth:`CountSketch.estimate` into a preallocated vector (like the copy), the
  median-over-rows estimate of every coordinate;
* ``heavy_hitters``: :meth:`CountSketch.heavy_hitters` with ``k = ceil(topk_fraction * d)`` and a
  preallocated ``out``, the whole top-k recovery from the table as the hook runs it (estimates,
  selection, and the top-k vector written into ``out``);
* ``topk``: ``estimate.abs().topk(k, sorted=False)``, the selection alone with ``torch.topk``, for
  reference.

Every case is measured on each kernel path (``numpy``, and ``compiled`` where numba is installed;
see :mod:`sketchcomm.sketch_compiled`). Every kernel is called often enough per repeat to run for
at least ``min_time`` seconds, the repeats of all kernels and paths of a case are interleaved (a
change in the machine's load affects them alike), and the median over the repeats is kept, after
warm-up calls. Ratios divide by the copy's time measured in the same run. The targets are
``sketch + unsketch`` within :data:`TARGET_RATIO` copies and ``heavy_hitters`` within
:data:`HEAVY_HITTERS_TARGET` copies.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.hook_step import kernel_path
from sketchcomm import compiled
from sketchcomm.sketch import CountSketch, prime_at_most

__all__ = [
    "DEFAULT_ROWS",
    "DEFAULT_SIZES",
    "HEAVY_HITTERS_TARGET",
    "KERNELS",
    "LARGE_SIZE",
    "TARGET_RATIO",
    "Case",
    "kernel_paths",
    "markdown_table",
    "measure_case",
    "plot",
    "run_benchmark",
    "sketch_columns",
]

KERNELS = ("sketch", "unsketch", "heavy_hitters", "topk")
DEFAULT_SIZES = (10**5, 10**6, 10**7)
LARGE_SIZE = 10**8
DEFAULT_ROWS = (1, 3, 5)
TARGET_RATIO = 3.0
HEAVY_HITTERS_TARGET = 4.0


def kernel_paths() -> list[str]:
    """The CPU kernel paths to measure: ``numpy``, and ``compiled`` where numba is installed."""
    return ["numpy", "compiled"] if compiled.numba is not None else ["numpy"]


@dataclass
class Case:
    """Median seconds per call of ``copy`` and every kernel in :data:`KERNELS` for one setting."""

    device: str
    path: str
    size: int
    rows: int
    columns: int
    k: int
    seconds: dict[str, float]

    @property
    def ratios(self) -> dict[str, float]:
        """Each kernel's time over the copy's, and ``sketch+unsketch`` (one bucket's round trip)."""
        copy = self.seconds["copy"]
        ratios = {name: self.seconds[name] / copy for name in KERNELS}
        ratios["sketch+unsketch"] = (self.seconds["sketch"] + self.seconds["unsketch"]) / copy
        return ratios

    @property
    def within_target(self) -> bool:
        """Whether ``sketch + unsketch`` takes at most :data:`TARGET_RATIO` copies."""
        return self.ratios["sketch+unsketch"] <= TARGET_RATIO

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios, "within_target": self.within_target}


def sketch_columns(size: int, rows: int, compression: float) -> int:
    """Columns of the table for a vector of ``size`` elements: ``prime_at_most(size // (compression
    * rows))``; a clear error when the table would be too small for the hash (``c < sqrt(d)``)."""
    target = int(size // (compression * rows))
    columns = prime_at_most(target) if target >= 2 else 0
    if columns * columns < size:
        raise ValueError(
            f"a vector of {size} elements leaves {columns} columns at compression {compression:g} "
            f"with {rows} rows, fewer than sqrt({size}): use a larger size, fewer rows or a lower "
            "compression"
        )
    return columns


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _seconds_per_call(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def measure_case(
    size: int,
    rows: int,
    compression: float,
    device: torch.device,
    *,
    paths: Sequence[str] = ("numpy",),
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.05,
    topk_fraction: float = 0.01,
    seed: int = 0,
) -> list[Case]:
    """Time ``copy`` and the :data:`KERNELS` for one size, number of rows and device, on each of
    ``paths`` (the CPU kernel paths; other devices have one), interleaved."""
    columns = sketch_columns(size, rows, compression)
    sketch = CountSketch(size, rows, columns, seed=seed, device=device)
    x = torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(device)
    dst, top = torch.empty_like(x), torch.empty_like(x)
    table = sketch.sketch(x)
    estimate = sketch.estimate(table)
    k = max(1, math.ceil(topk_fraction * size))
    kernels: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(x),
        "sketch": lambda: sketch.sketch(x),
        "unsketch": lambda: sketch.estimate(table, out=dst),
        "heavy_hitters": lambda: sketch.heavy_hitters(table, k, out=top),
        "topk": lambda: estimate.abs().topk(k, sorted=False),
    }
    paths = list(paths) if device.type == "cpu" else [paths[-1]]
    sync = _synchronizer(device)
    calls: dict[tuple[str, str], int] = {}
    for path in paths:
        with kernel_path(path):
            for name, fn in kernels.items():
                for _ in range(warmup):
                    fn()
                seconds = _seconds_per_call(fn, 1, sync)
                calls[path, name] = max(1, math.ceil(min_time / seconds))
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for path in paths:
            with kernel_path(path):
                for name, fn in kernels.items():
                    samples[path, name].append(_seconds_per_call(fn, calls[path, name], sync))
    return [
        Case(
            str(device),
            path,
            size,
            rows,
            columns,
            k,
            {name: statistics.median(samples[path, name]) for name in kernels},
        )
        for path in paths
    ]


def _cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one (Linux), else the platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _environment(devices: Sequence[torch.device]) -> dict[str, Any]:
    environment: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for device in devices:
        if device.type == "cuda":
            environment[str(device)] = torch.cuda.get_device_name(device)
    return environment


def run_benchmark(
    sizes: Sequence[int],
    rows: Sequence[int],
    compression: float,
    devices: Sequence[torch.device],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.05,
    topk_fraction: float = 0.01,
    paths: Sequence[str] | None = None,
    progress: Callable[[Case], None] | None = None,
) -> dict[str, Any]:
    """Every combination of device, size and rows; returns a JSON-ready report with the cases.

    Every setting is checked before the first measurement, so that a bad one fails at once.
    ``paths`` defaults to :func:`kernel_paths`.
    """
    paths = kernel_paths() if paths is None else list(paths)
    for size in sizes:
        for r in rows:
            sketch_columns(size, r, compression)
    cases = []
    for device in devices:
        for size in sizes:
            for r in rows:
                measured = measure_case(
                    size,
                    r,
                    compression,
                    device,
                    paths=paths,
                    repeats=repeats,
                    warmup=warmup,
                    min_time=min_time,
                    topk_fraction=topk_fraction,
                )
                cases.extend(measured)
                if progress is not None:
                    for case in measured:
                        progress(case)
    config = {
        "sizes": list(sizes),
        "rows": list(rows),
        "compression": compression,
        "devices": [str(d) for d in devices],
        "paths": paths,
        "repeats": repeats,
        "warmup": warmup,
        "min_time": min_time,
        "topk_fraction": topk_fraction,
    }
    return {
        "benchmark": "kernels",
        "config": config,
        "environment": _environment(devices),
        "cases": [case.as_dict() for case in cases],
    }


def _format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _format_size(size: int) -> str:
    """``100000`` as ``1e5``, ``6500000`` as ``6.5e6``."""
    exponent = len(str(size)) - 1
    return f"{size / 10**exponent:g}e{exponent}"


def markdown_table(report: dict[str, Any]) -> str:
    """The cases of a :func:`run_benchmark` report as a Markdown table of ratios to the copy, with
    whether ``sketch + unsketch`` is within :data:`TARGET_RATIO` copies."""
    round_trip, selection = ("sketch", "unsketch", "sketch+unsketch"), ("heavy_hitters", "topk")
    header = [
        "device",
        "path",
        "d",
        "rows",
        "columns",
        "copy",
        *(f"{name} / copy" for name in round_trip),
        f"within {TARGET_RATIO:g}x",
        *(f"{name} / copy" for name in selection),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in report["cases"]:
        r = case["ratios"]
        cells = [
            case["device"],
            case["path"],
            _format_size(case["size"]),
            str(case["rows"]),
            str(case["columns"]),
            _format_seconds(case["seconds"]["copy"]),
            *(f"{r[name]:.1f}x" for name in round_trip),
            "yes" if case["within_target"] else "no",
            *(f"{r[name]:.1f}x" for name in selection),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Ratios to the copy against the size, one panel per kernel, one line per device and rows
    (a PNG at ``path``; needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = ["sketch", "unsketch", "sketch+unsketch", "heavy_hitters"]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for case in report["cases"]:
        series.setdefault((f"{case['device']} {case['path']}", case["rows"]), []).append(case)
    for axis, name in zip(axes, panels, strict=True):
        for (device, rows), cases in sorted(series.items()):
            cases = sorted(cases, key=lambda c: c["size"])
            axis.plot(
                [c["size"] for c in cases],
                [c["ratios"][name] for c in cases],
                marker="o",
                linestyle="-" if device.endswith("compiled") else "--",
                label=f"{device}, r={rows}",
            )
        if name == "sketch+unsketch":
            axis.axhline(TARGET_RATIO, color="gray", linewidth=0.8, linestyle=":", label="target")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(f"{name} / copy")
        axis.set_xlabel("vector size d")
    axes[0].set_ylabel(f"time / copy (compression {report['config']['compression']:g})")
    axes[2].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
