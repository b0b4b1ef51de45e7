"""From a summed Count Sketch table to a gradient: top-k or dense recovery, and FetchSGD's
momentum and error accumulation in sketch space (Rothchild et al., ICML 2020).

Decoding needs three settings only, held in a [`DecodeConfig`][sketchcomm.recovery.DecodeConfig];
the per-bucket tensors live in a [`BucketState`][sketchcomm.buckets.BucketState].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sketchcomm.buckets import BucketState

__all__ = ["DecodeConfig", "decode", "decode_or_exact", "output_buffer"]


@dataclass(frozen=True)
class DecodeConfig:
    """How a summed table becomes the estimated sum of the ranks' vectors.

    ``recovery`` is ``"topk"`` (the ``topk`` largest estimates, zero elsewhere) or ``"dense"``
    (the median estimate of every coordinate); ``error_feedback="sketch"`` accumulates momentum
    ``momentum`` and error on the summed table first (FetchSGD).

    >>> from sketchcomm.sketch import CountSketch
    >>> sketch = CountSketch(4, 1, 5)
    >>> bucket = BucketState(("shapes",), sketch, topk=1, candidates=1)
    >>> table = sketch.sketch(torch.tensor([0.0, 3.0, 0.0, 1.0]))
    >>> decode(DecodeConfig("topk", "none", 0.0), bucket, table).tolist()
    [0.0, 3.0, 0.0, 0.0]
    """

    recovery: str
    error_feedback: str
    momentum: float


def output_buffer(bucket: BucketState, device: torch.device) -> Tensor:
    """The bucket's ``[d]`` fp32 result vector on ``device``, made once and rewritten every step
    (a fresh ``d``-element vector would be page-faulted in anew each step). The hooks copy the
    result into their own message before the bucket's next step, so reuse never reaches a
    result still in use."""
    dim = bucket.sketch.dim
    if bucket.output is None or bucket.output.device != device or bucket.output.numel() != dim:
        bucket.output = torch.empty(dim, dtype=torch.float32, device=device)
    return bucket.output


def _recover(config: DecodeConfig, bucket: BucketState, table: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[d]`` fp32 estimate of the sum, and the selected indices (all for dense), written
    into the bucket's [`output_buffer()`][sketchcomm.recovery.output_buffer]."""
    sketch, out = bucket.sketch, output_buffer(bucket, table.device)
    if config.recovery == "dense":
        return sketch.estimate(table, out=out), torch.arange(0)
    indices, _ = sketch.heavy_hitters(table, bucket.topk, out=out)
    return out, indices


def _sketch_space_step(config: DecodeConfig, bucket: BucketState, summed: Tensor) -> Tensor:
    """FetchSGD: accumulate momentum and error on the aggregated table, extract the top-k, then
    zero the cells of both tables that the extracted coordinates hash to."""
    if bucket.error_table is None:
        bucket.error_table = torch.zeros_like(summed)
    if config.momentum and bucket.momentum_table is None:
        # Also when momentum starts after the error table (an optimizer attached late).
        bucket.momentum_table = torch.zeros_like(summed)
    if bucket.momentum_table is not None:
        bucket.momentum_table.mul_(config.momentum).add_(summed)
        bucket.error_table.add_(bucket.momentum_table)
    else:
        bucket.error_table.add_(summed)
    update, indices = _recover(config, bucket, bucket.error_table)
    bucket.sketch.zero_cells(bucket.error_table, indices)
    if bucket.momentum_table is not None:
        bucket.sketch.zero_cells(bucket.momentum_table, indices)
    return update


def decode(config: DecodeConfig, bucket: BucketState, summed: Tensor) -> Tensor:
    """The estimated sum ``[d]`` (fp32, canonical order) from a summed ``[r, c]`` table, updating
    the bucket's sketch-space error and momentum when ``error_feedback="sketch"``."""
    if config.error_feedback == "sketch":
        return _sketch_space_step(config, bucket, summed)
    return _recover(config, bucket, summed)[0]


def decode_or_exact(config: DecodeConfig, bucket: BucketState, summed: Tensor) -> Tensor:
    """[`decode()`][sketchcomm.recovery.decode], or the table itself read back when it holds the
    vector without collisions (a one-row table at least as wide as the bucket,
    [`CountSketch.is_exact`][sketchcomm.CountSketch.is_exact]). An exact table keeps the same
    momentum as a sketched one, ``m <- rho m + summed``, and is read back whole (every coordinate
    is recovered, so no error is left to accumulate): the update is heavy-ball momentum SGD's."""
    if not bucket.sketch.is_exact:
        return decode(config, bucket, summed)
    if config.error_feedback == "sketch" and config.momentum:
        if bucket.momentum_table is None:
            bucket.momentum_table = torch.zeros_like(summed)
        summed = bucket.momentum_table.mul_(config.momentum).add_(summed)
    return bucket.sketch.estimate(summed, out=output_buffer(bucket, summed.device))
