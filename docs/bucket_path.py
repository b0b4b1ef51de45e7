"""Draw docs/bucket_path.png: the path of one gradient bucket through the hook engine.

Run from the repository root: python docs/bucket_path.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

STEPS = [
    ("DDP bucket", "flat gradient buffer [d]"),
    ("HookState.open", "layout (canonical order)\nbucket state, agreement check"),
    (
        "BucketContext.build",
        "message: sketch table [r, c]\n(private: clip + noise)\nzeros on failure",
    ),
    ("exchange", "allreduce (or allgather)\nmessage + one flag per rank"),
    ("flags, finite check", "a flag: RemoteHookError\nnon-finite: NaN or raise"),
    ("decode", "recovery.decode(DecodeConfig,\nBucketState, summed)"),
    ("StepGuard", "all buckets arrived:\nrelease results to DDP\n(failed step: clear grads)"),
]


def main() -> None:
    figure, axes = plt.subplots(figsize=(14, 3.2))
    width, gap = 1.75, 0.3
    for i, (title, detail) in enumerate(STEPS):
        x = i * (width + gap)
        box = FancyBboxPatch(
            (x, 0), width, 2.2, boxstyle="round,pad=0.05", facecolor="#e8f0fe", edgecolor="#1a73e8"
        )
        axes.add_patch(box)
        axes.text(x + width / 2, 1.8, title, ha="center", va="center", fontsize=9, weight="bold")
        axes.text(x + width / 2, 0.9, detail, ha="center", va="center", fontsize=7.5)
        if i < len(STEPS) - 1:
            axes.annotate(
                "",
                xy=(x + width + gap, 1.1),
                xytext=(x + width + 0.02, 1.1),
                arrowprops={"arrowstyle": "->", "color": "#1a73e8"},
            )
    axes.text(
        (len(STEPS) * (width + gap)) / 2,
        -0.45,
        "stats: SketchStats.record_bucket at build time; end_iteration after the last bucket",
        ha="center",
        fontsize=8,
        style="italic",
    )
    axes.set_xlim(-0.2, len(STEPS) * (width + gap))
    axes.set_ylim(-0.7, 2.5)
    axes.axis("off")
    figure.tight_layout()
    figure.savefig(Path(__file__).with_name("bucket_path.png"), dpi=110)


if __name__ == "__main__":
    main()
