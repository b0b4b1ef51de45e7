"""From a summed Count Sketch table to a gradient: top-k or dense recovery, and FetchSGD's
momentum and error accumulation in sketch space (Rothchild et al., ICML 2020).

Decoding needs three settings only, held in a [`DecodeConfig`][sketchcomm.recovery.DecodeConfig];
the per-bucket tensors live in a [`BucketState`][sketchcomm.buckets.BucketState].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sketchcomm.buckets import BucketState
from sketchcomm.placement import Placement

__all__ = ["DecodeConfig", "decode", "decode_into", "decode_or_exact", "output_buffer"]


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


_Recover = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def output_buffer(bucket: BucketState, device: torch.device) -> Tensor:
    """The bucket's ``[d]`` fp32 result vector on ``device``, made once and rewritten every step
    (a fresh ``d``-element vector would be page-faulted in anew each step). The hooks copy the
    result into their own message before the bucket's next step, so reuse never reaches a
    result still in use."""
    dim = bucket.sketch.dim
    if bucket.output is None or bucket.output.device != device or bucket.output.numel() != dim:
        bucket.output = torch.empty(dim, dtype=torch.float32, device=device)
    return bucket.output


def _recover(
    config: DecodeConfig,
    bucket: BucketState,
    table: Tensor,
    target: Tensor | None = None,
    placement: Placement | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Dense ``[d]`` fp32 estimate of the sum, and the selected indices (``None``: every
    coordinate), written into the bucket's [`output_buffer()`][sketchcomm.recovery.output_buffer],
    or into ``target`` at ``placement``'s positions (then ``target`` is returned). A top-k that
    keeps every coordinate (``k >= d``) is the median estimate itself, computed as such."""
    sketch = bucket.sketch
    placed = target is not None and placement is not None and not placement.is_identity
    where = placement if placed else None
    out = target if target is not None else output_buffer(bucket, table.device)
    if config.recovery == "dense" or bucket.topk >= sketch.dim:
        return sketch.estimate(table, out=out, placement=where), None
    if placed and table.device.type != "cpu":
        canonical = output_buffer(bucket, table.device)
        indices, _ = sketch.heavy_hitters(table, bucket.topk, out=canonical)
        return placement.scatter(canonical, target), indices
    indices, _ = sketch.heavy_hitters(table, bucket.topk, out=out, placement=where)
    return out, indices


def _sketch_space_step(
    config: DecodeConfig, bucket: BucketState, summed: Tensor, recover: _Recover
) -> Tensor:
    """FetchSGD: accumulate momentum and error on the aggregated table, extract the top-k (with
    ``recover`` from the error table), then zero the cells of both tables that the extracted
    coordinates hash to. When every coordinate is extracted that is every cell some coordinate
    hashes to, and the others never hold anything: both tables are zeroed whole."""
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
    update, indices = recover(bucket.error_table)
    if indices is not None:
        bucket.sketch.zero_cells(bucket.error_table, indices, bucket.momentum_table)
        return update
    bucket.error_table.zero_()
    if bucket.momentum_table is not None:
        bucket.momentum_table.zero_()
    return update


def decode(config: DecodeConfig, bucket: BucketState, summed: Tensor) -> Tensor:
    """The estimated sum ``[d]`` (fp32, canonical order) from a summed ``[r, c]`` table, updating
    the bucket's sketch-space error and momentum when ``error_feedback="sketch"``."""
    if config.error_feedback == "sketch":
        return _sketch_space_step(
            config, bucket, summed, lambda table: _recover(config, bucket, table)
        )
    return _recover(config, bucket, summed)[0]


def decode_into(
    config: DecodeConfig,
    bucket: BucketState,
    summed: Tensor,
    target: Tensor,
    placement: Placement,
    divisor: float = 1.0,
) -> Tensor:
    """[`decode()`][sketchcomm.recovery.decode] divided by ``divisor`` (positive), written into
    ``target`` (contiguous fp32, e.g. the bucket buffer) at ``placement``'s positions; returns
    ``target``. The error and momentum tables keep the sums, as with `decode()`.

    With an odd number of rows the median only selects among the ``r`` signed cells, and the top-k
    only compares magnitudes, so both commute with a positive scale: the ``[r, c]`` table is
    divided instead of the ``[d]`` result, bit for bit the same values (``fl(x / w)`` is monotone),
    the same selection up to ties. With an even number of rows (a mean of two) the result is
    divided.

    >>> from sketchcomm.sketch import CountSketch
    >>> sketch = CountSketch(4, 1, 5)
    >>> bucket = BucketState(("shapes",), sketch, topk=1, candidates=1)
    >>> table = sketch.sketch(torch.tensor([0.0, 3.0, 0.0, 1.0]))
    >>> placement, target = Placement(((2, 2), (0, 2)), 4), torch.empty(4)
    >>> decode_into(DecodeConfig("topk", "none", 0.0), bucket, table, target, placement, 2).tolist()
    [0.0, 0.0, 0.0, 1.5]
    """
    scale_table = divisor != 1 and bucket.sketch.rows % 2 == 1

    def recover(table: Tensor) -> tuple[Tensor, Tensor | None]:
        scaled = table / divisor if scale_table else table
        return _recover(config, bucket, scaled, target, placement)

    if config.error_feedback == "sketch":
        _sketch_space_step(config, bucket, summed, recover)
    else:
        recover(summed)
    if divisor != 1 and not scale_table:
        for _, offset, length in placement.segments():
            target[offset : offset + length].div_(divisor)
    return target


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
