"""Plot of a GEAR evaluation: the error each cache adds, against its bit width."""

from __future__ import annotations

import os
from collections.abc import Sequence

from benchmarks.gear_evaluate import CacheResult


def plot_error_against_bits(results: Sequence[CacheResult], path: str | os.PathLike[str]) -> None:
    """Write a PNG with two panels against bits: the perplexity increase over the uncompressed
    cache (percent) and the KL divergence to its next-token distribution (nats).

    ``results`` is what :func:`benchmarks.gear_evaluate.evaluate_caches` returns: the first entry
    is the uncompressed reference; every other entry with a ``bits`` or ``nbits`` setting is a
    point, grouped into one line per kind (GEAR, quantization only, quanto).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference, *others = results
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for result in others:
        bits = result.settings.get("bits", result.settings.get("nbits"))
        if bits is None:
            continue
        label = result.name.split(" ")[0]
        increase = 100.0 * (result.perplexity / reference.perplexity - 1.0)
        lines.setdefault(label, []).append((int(bits), increase, result.kl_divergence))
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, points in lines.items():
        points.sort()
        bits = [p[0] for p in points]
        left.plot(bits, [p[1] for p in points], marker="o", label=label)
        right.plot(bits, [p[2] for p in points], marker="o", label=label)
    for axis, title in ((left, "perplexity increase (%)"), (right, "KL to uncompressed (nats)")):
        axis.set_xlabel("bits per entry (codes)")
        axis.set_title(title)
        axis.set_yscale("symlog", linthresh=0.1 if axis is left else 1e-3)
        axis.grid(alpha=0.3)
    left.legend()
    figure.suptitle(f"KV-cache compression, uncompressed perplexity {reference.perplexity:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_frontier(points: Sequence, path: str | os.PathLike[str]) -> None:
    """Write a PNG of perplexity increase (percent, symlog) against compression (float16 bytes
    over bytes held), one panel per text and prompt length, one line per method.

    ``points`` are :class:`benchmarks.gear_frontier.FrontierPoint` objects.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, int], list] = {}
    for point in points:
        panels.setdefault((point.text, point.prefill), []).append(point)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True
    )
    for axis, ((text, prefill), group) in zip(axes[0], panels.items(), strict=True):
        methods: dict[str, list] = {}
        for point in group:
            methods.setdefault(point.method, []).append(point)
        for method, members in methods.items():
            members.sort(key=lambda p: p.compression)
            axis.plot(
                [p.compression for p in members],
                [p.increase for p in members],
                marker="o",
                label=method,
            )
            for p in members:
                axis.annotate(f"{p.bits}b", (p.compression, p.increase), fontsize=7)
        axis.set_title(f"{text}, prompt {prefill} + {group[0].tokens} steps", fontsize=9)
        axis.set_xlabel("KV compression (float16 bytes / bytes held)")
        axis.set_yscale("symlog", linthresh=0.1)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity increase (%)")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
