r"""Per-example contributions of a gradient bucket, ready when DDP fires it.

For ``unit="example"`` each rank contributes one table per example to each bucket. The
per-example gradients come from :class:`~sketchcomm.privacy.capture.PerExampleGradients`; for a
bucket of ``d`` elements they are gathered in the bucket's canonical order into ``[B, d]`` and
sketched row by row into ``[B, r, c]`` tables, which the mechanism clips and sums. The first time a
bucket is seen, the rows are checked against the bucket's own gradient: they must add up to it
(``sum_b g_b = g``), which catches gradients accumulated outside the capture.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sketchcomm.engine import BucketContext
from sketchcomm.privacy.capture import PerExampleGradients

__all__ = ["ExampleContributions"]


class ExampleContributions:
    """The per-example rows and tables of every bucket of ``model``.

    >>> import torch
    >>> from torch import nn
    >>> contributions = ExampleContributions(nn.Linear(3, 2))
    >>> contributions.capture.held_bytes()
    0
    >>> contributions.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self.capture = PerExampleGradients(model)
        self.checked_buckets: set[int] = set()

    def rows(self, context: BucketContext) -> Tensor:
        """``[B, d]`` per-example gradients of the bucket (canonical order), checked once against
        the bucket's gradient."""
        params = context.bucket.parameters()
        samples = torch.cat([self.capture.pop(params[i]).float() for i in context.layout.order], 1)
        index = context.bucket.index()
        if index not in self.checked_buckets:
            expected = context.canonical().float()
            error = (samples.sum(0) - expected).abs().max().item() if len(samples) else 0.0
            scale = expected.abs().max().item() + 1e-12
            if error > 1e-3 * scale + 1e-6:
                raise ValueError(
                    f"per-example gradients of bucket {index} do not add up to its gradient "
                    f"(max difference {error:.3g}): zero the gradients before each backward, run "
                    "one forward per backward (no accumulation under no_sync), and train only "
                    "supported layers"
                )
            self.checked_buckets.add(index)
        return samples

    def tables(self, context: BucketContext) -> Tensor:
        """``[B, r, c]`` tables of this rank's examples for the bucket."""
        return context.sketch.sketch_batch(self.rows(context))

    def clear(self) -> None:
        """Drop every captured row (a failed or refused step)."""
        self.capture.clear()

    def remove(self) -> None:
        """Detach the capture's hooks."""
        self.capture.remove()
