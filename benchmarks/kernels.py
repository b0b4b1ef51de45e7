"""Time of the Count Sketch kernels relative to a plain copy of the same vector.

For each device, vector size ``d`` and number of rows ``r``, a :class:`CountSketch` with
``c = prime_at_most(d // (compression * r))`` columns is built (a table of about
``d / compression`` elements, as :class:`sketchcomm.SketchState` builds for a bucket), and these
kernels are timed on one random fp32 vector:

* ``copy``: ``dst.copy_(src)`` into a preallocated vector of ``d`` elements, the reference;
* ``sketch``: :meth:`CountSketch.sketch` of the vector into a new table;
* ``unsketch``: :meth:`CountSketch.estimate` into a preallocated vector (like the copy), the
  median-over-rows estimate of every coordinate;
* ``heavy_hitters``: :meth:`CountSketch.heavy_hitters` with ``k = ceil(topk_fraction * d)``, the
  whole top-k recovery from the table (estimates and selection);
* ``topk``: ``estimate.abs().topk(k, sorted=False)``, the selection alone with ``torch.topk``, for
  reference.

Every kernel is called often enough per repeat to run for at least ``min_time`` seconds, the
repeats of all kernels of a case are interleaved (a change in the machine's load affects them
alike), and the median over the repeats is kept, after warm-up calls. Ratios divide by the copy's
time measured in the same run. The target is ``sketch + unsketch`` within :data:`TARGET_RATIO`
times the copy: a bucket's round trip through the sketch costs at most a few copies of it.
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

from sketchcomm.sketch import CountSketch, prime_at_most

__all__ = [
    "DEFAULT_ROWS",
    "DEFAULT_SIZES",
    "KERNELS",
    "LARGE_SIZE",
    "TARGET_RATIO",
    "Case",
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
TARGET_RATIO = 5.0


@dataclass
class Case:
    """Median seconds per call of ``copy`` and every kernel in :data:`KERNELS` for one setting."""

    device: str
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
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.05,
    topk_fraction: float = 0.01,
    seed: int = 0,
) -> Case:
    """Time ``copy`` and the :data:`KERNELS` for one size, number of rows and device."""
    columns = sketch_columns(size, rows, compression)
    sketch = CountSketch(size, rows, columns, seed=seed, device=device)
    x = torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(device)
    dst = torch.empty_like(x)
    table = sketch.sketch(x)
    estimate = sketch.estimate(table)
    k = max(1, math.ceil(topk_fraction * size))
    kernels: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(x),
        "sketch": lambda: sketch.sketch(x),
        "unsketch": lambda: sketch.estimate(table, out=dst),
        "heavy_hitters": lambda: sketch.heavy_hitters(table, k),
        "topk": lambda: estimate.abs().topk(k, sorted=False),
    }
    sync = _synchronizer(device)
    calls = {}
    for name, fn in kernels.items():
        for _ in range(warmup):
            fn()
        calls[name] = max(1, math.ceil(min_time / _seconds_per_call(fn, 1, sync)))
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, fn in kernels.items():
            samples[name].append(_seconds_per_call(fn, calls[name], sync))
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    return Case(str(device), size, rows, columns, k, seconds)


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
    progress: Callable[[Case], None] | None = None,
) -> dict[str, Any]:
    """Every combination of device, size and rows; returns a JSON-ready report with the cases.

    Every setting is checked before the first measurement, so that a bad one fails at once.
    """
    for size in sizes:
        for r in rows:
            sketch_columns(size, r, compression)
    cases = []
    for device in devices:
        for size in sizes:
            for r in rows:
                case = measure_case(
                    size,
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
    config = {
        "sizes": list(sizes),
        "rows": list(rows),
        "compression": compression,
        "devices": [str(d) for d in devices],
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
        series.setdefault((case["device"], case["rows"]), []).append(case)
    for axis, name in zip(axes, panels, strict=True):
        for (device, rows), cases in sorted(series.items()):
            cases = sorted(cases, key=lambda c: c["size"])
            axis.plot(
                [c["size"] for c in cases],
                [c["ratios"][name] for c in cases],
                marker="o",
                linestyle="-" if device == "cpu" else "--",
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
