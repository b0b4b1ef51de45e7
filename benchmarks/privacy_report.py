"""Reports of the privacy benchmark: summaries over seeds, Markdown tables and the accuracy plot."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.privacy_config import METHODS, BenchConfig
from benchmarks.privacy_tasks import TASKS

__all__ = ["METRICS", "markdown_table", "plot_accuracy", "summarize"]

#: The metrics of a row that :func:`summarize` averages, with how :func:`markdown_table` shows
#: them: (caption, scale, decimals).
METRICS: dict[str, tuple[str, float, int]] = {
    "test_accuracy": ("Test accuracy in %", 100.0, 1),
    "test_loss": ("Test cross-entropy in nats per prediction", 1.0, 3),
}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (0 for one run) of every metric of :data:`METRICS` per
    (label, method, target epsilon), as ``"<metric>_mean"`` and ``"<metric>_std"``, with the
    largest epsilon spent and the bytes sent per step."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["method"], row["epsilon_target"]), []).append(row)
    summary = []
    for (label, method, target), members in groups.items():
        spent = [r["epsilon"] for r in members if r["epsilon"] is not None]
        entry = {
            "label": label,
            "method": method,
            "epsilon_target": target,
            "epsilon_max": max(spent) if spent else None,
            "runs": len(members),
            "bytes_per_step": members[0]["bytes_per_step"],
        }
        for metric in METRICS:
            values = [r[metric] for r in members]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def _cell(entry: dict[str, Any] | None, metric: str) -> str:
    if entry is None:
        return "–"
    _, scale, decimals = METRICS[metric]
    mean, std = scale * entry[f"{metric}_mean"], scale * entry[f"{metric}_std"]
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def markdown_table(
    summary: Sequence[dict[str, Any]], config: BenchConfig, metric: str = "test_accuracy"
) -> str:
    """``metric`` (mean ± standard deviation over seeds) as a Markdown table: per method and
    target epsilon with the bytes each rank sends per step, or for the rows of a sweep (which
    carry labels), per setting and method. A footnote states the privacy guarantee."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    by_key = {(s["label"], s["method"], s["epsilon_target"]): s for s in summary}
    labels = list(dict.fromkeys(s["label"] for s in summary))
    methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
    targets = sorted({s["epsilon_target"] for s in summary if s["epsilon_target"] is not None})
    if labels == [""]:
        ceiling = ["no privacy"] if any(s["epsilon_target"] is None for s in summary) else []
        columns = [*targets, None] if ceiling else targets
        head = ["method", "bytes/step"] + [f"ε = {t:g}" for t in targets] + ceiling
        body = []
        for method in methods:
            entries = [by_key.get(("", method, t)) for t in columns]
            nbytes = next(e for e in entries if e is not None)["bytes_per_step"]
            body.append([method, f"{nbytes:,}"] + [_cell(e, metric) for e in entries])
    else:
        head = ["setting", *methods]
        body = [
            [label] + [_cell(_lookup(by_key, label, m), metric) for m in methods]
            for label in labels
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", f"{METRICS[metric][0]} (mean ± sample standard deviation over seeds)."]
    if targets:
        spent = [
            f"{t:g} → {max(s['epsilon_max'] for s in summary if s['epsilon_target'] == t):.3f}"
            for t in targets
        ]
        t = config.colluding_ranks
        towards = (
            "towards outside observers, ranks trusted (t = 0)"
            if t == 0
            else f"towards outside observers and any {t} colluding rank(s) of the hook methods"
        )
        lines[-1] += (
            f" Privacy: (ε, δ = {config.delta:g})-DP per training example, add/remove-one "
            f"adjacency, Poisson sampling, {config.accountant} accountant, {towards}; largest ε "
            "spent per target: " + ", ".join(spent) + "."
        )
    if not config.private:
        lines.append(f"**{config.sampling()}.**")
    return "\n".join(lines)


def _lookup(by_key: dict[tuple, dict[str, Any]], label: str, method: str) -> dict[str, Any] | None:
    """The summary entry of ``method`` in sweep setting ``label`` (at whatever epsilon)."""
    return next((e for (lab, m, _), e in by_key.items() if lab == label and m == method), None)


def plot_accuracy(
    summary: Sequence[dict[str, Any]], path: str | os.PathLike[str], config: BenchConfig
) -> None:
    """Save a PNG of test accuracy against target epsilon (log scale), one line per method with
    ± one standard deviation, the non-private ceiling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=100)
    for method in METHODS:
        entries = sorted(
            (s for s in summary if s["method"] == method and s["epsilon_target"] is not None),
            key=lambda s: s["epsilon_target"],
        )
        ceiling = [s for s in summary if s["method"] == method and s["epsilon_target"] is None]
        if entries:
            ax.errorbar(
                [s["epsilon_target"] for s in entries],
                [s["test_accuracy_mean"] for s in entries],
                yerr=[s["test_accuracy_std"] for s in entries],
                marker="o",
                capsize=3,
                label=method,
            )
        for s in ceiling:
            ax.axhline(
                s["test_accuracy_mean"], color="black", linestyle="--", label="no privacy (ceiling)"
            )
    targets = sorted({s["epsilon_target"] for s in summary if s["epsilon_target"] is not None})
    ax.set_xscale("log", base=2)
    ax.set_xticks(targets, [f"{t:g}" for t in targets])
    ax.set_xlabel(f"target ε (δ = {config.delta:g}, per example)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{TASKS[config.task]}, {config.world} ranks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
