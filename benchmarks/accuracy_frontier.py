"""The bytes-vs-eval-loss frontier of the accuracy benchmark's methods.

``python -m benchmarks.accuracy_frontier RESULTS.json [MORE.json ...] --plot FIGURE.png`` reads
the per-run results that ``python -m benchmarks.accuracy --json`` writes (or the JSON lines of
``--progress``; several files are read as one list, a run found in more than one counted once),
prints the frontier table (method, bytes per rank per step, eval loss mean ± half range over the
seeds, eval loss relative to allreduce's run of the same seed) and draws one panel per optimizer:
bytes per step on a log axis against the relative eval loss, one line per method family
(``allreduce`` and ``fp16`` are single points, ``powersgd`` one point per rank, a sketch method
one point per compression).

>>> rows = [
...     {"model": "gpt2", "optimizer": "sgd", "method": "allreduce", "step_bytes": 400,
...      "relative": 1.0, "spread": 0.0, "eval_loss": 2.0, "loss_spread": 0.1, "seeds": 3},
...     {"model": "gpt2", "optimizer": "sgd", "method": "powersgd@4", "step_bytes": 20,
...      "relative": 1.01, "spread": 0.01, "eval_loss": 2.02, "loss_spread": 0.1, "seeds": 3},
... ]
>>> print(frontier_markdown(rows).splitlines()[-1])
| gpt2 | sgd | powersgd@4 | 20 | 20.0x | 2.020 ± 0.100 | 1.010 ± 0.010 | 3 |
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.accuracy import summarise
from benchmarks.accuracy_methods import check_method

__all__ = [
    "distinct_runs",
    "family_lines",
    "frontier_markdown",
    "load_results",
    "main",
    "plot_frontier",
]


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per-run results from a JSON list or a JSON lines file."""
    with open(path) as file:
        text = file.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def distinct_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` without repeats: the first run of each (model, steps, seed, optimizer, method)."""
    seen: set[tuple] = set()
    distinct = []
    for run in runs:
        key = (run.get("model", "char"), run["steps"], run["seed"], run["optimizer"], run["method"])
        if key not in seen:
            seen.add(key)
            distinct.append(run)
    return distinct


def sort_key(row: dict[str, Any]) -> tuple[str, str, float]:
    return (row["model"], row["optimizer"], -row["step_bytes"])


def frontier_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`benchmarks.accuracy.summarise` as a table, most bytes first per optimizer;
    the ratio is allreduce's bytes over the method's."""
    dense = {
        (r["model"], r["optimizer"]): r["step_bytes"] for r in rows if r["method"] == "allreduce"
    }
    lines = [
        "| model | optimizer | method | bytes per step | vs allreduce bytes | eval loss "
        "(mean ± half range) | vs allreduce loss (mean ± half range) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=sort_key):
        reference = dense.get((r["model"], r["optimizer"]), r["step_bytes"])
        ratio = reference / r["step_bytes"] if r["step_bytes"] else float("nan")
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['method']} | {r['step_bytes']:,.0f} | "
            f"{ratio:.1f}x | {r['eval_loss']:.3f} ± {r['loss_spread']:.3f} | "
            f"{r['relative']:.3f} ± {r['spread']:.3f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def family_lines(
    rows: Sequence[dict[str, Any]], optimizer: str
) -> dict[str, list[tuple[float, float, float]]]:
    """``{family: [(bytes per step, relative loss, spread), ...]}`` of one optimizer, each line
    sorted by bytes."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["optimizer"] == optimizer:
            family = check_method(r["method"])
            lines.setdefault(family, []).append((r["step_bytes"], r["relative"], r["spread"]))
    return {family: sorted(points) for family, points in lines.items()}


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write a PNG with one panel per optimizer: bytes per step (log) against eval loss relative
    to allreduce, one line per method family with the seeds' half range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = sorted({r["optimizer"] for r in rows}, reverse=True)
    figure, axes = plt.subplots(1, len(optimizers), figsize=(5 * len(optimizers), 3.8))
    axes = [axes] if len(optimizers) == 1 else list(axes)
    model = rows[0]["model"] if rows else ""
    for axis, optimizer in zip(axes, optimizers, strict=True):
        for family, points in family_lines(rows, optimizer).items():
            axis.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[p[2] for p in points],
                marker="o",
                capsize=3,
                label=family,
            )
        axis.set_xscale("log")
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel("bytes per rank per step")
        axis.set_ylabel("eval loss / allreduce's (same seed)")
        axis.set_title(f"{model}, {optimizer}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", nargs="+", help="JSON (or JSON lines) of python -m benchmarks.accuracy"
    )
    parser.add_argument("--plot", help="write the frontier figure here (PNG)")
    args = parser.parse_args(argv)
    rows = summarise(distinct_runs([run for path in args.results for run in load_results(path)]))
    print(frontier_markdown(rows))
    if args.plot:
        plot_frontier(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
