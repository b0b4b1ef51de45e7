"""From a summed Count Sketch table to a gradient: top-k or dense recovery, and FetchSGD's
momentum and error accumulation in sketch space (Rothchild et al., ICML 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sketchcomm.sketch import CountSketch

if TYPE_CHECKING:
    from sketchcomm.hooks import SketchState


@dataclass
class BucketState:
    """What the hook keeps for one gradient bucket, keyed by ``bucket.index()``; ``layout`` is the
    :attr:`BucketLayout.key` of the parameters it was made for."""

    layout: tuple
    sketch: CountSketch
    k: int
    m: int
    residual: Tensor | None = None
    error_table: Tensor | None = None
    momentum_table: Tensor | None = None


def recover(state: SketchState, bs: BucketState, table: Tensor) -> tuple[Tensor, Tensor | None]:
    """From a summed (and for ``"sketch"`` error feedback, accumulated) table to the estimated
    *sum* of the ranks' vectors: dense ``[d]`` fp32, and the selected indices for top-k."""
    if state.recovery == "dense":
        return bs.sketch.estimate(table), None
    indices, values = bs.sketch.heavy_hitters(table, bs.k)
    dense = torch.zeros(bs.sketch.dim, dtype=torch.float32, device=table.device)
    dense[indices] = values
    return dense, indices


def sketch_space_step(state: SketchState, bs: BucketState, summed: Tensor) -> Tensor:
    """FetchSGD: accumulate momentum and error on the aggregated table, extract the top-k, then
    zero the cells of both tables that the extracted coordinates hash to."""
    if bs.error_table is None:
        bs.error_table = torch.zeros_like(summed)
        bs.momentum_table = torch.zeros_like(summed) if state.momentum else None
    if bs.momentum_table is not None:
        bs.momentum_table.mul_(state.momentum).add_(summed)
        bs.error_table.add_(bs.momentum_table)
    else:
        bs.error_table.add_(summed)
    update, indices = recover(state, bs, bs.error_table)
    assert indices is not None
    cells, _ = bs.sketch.buckets_and_signs(indices)
    bs.error_table.scatter_(1, cells, 0.0)
    if bs.momentum_table is not None:
        bs.momentum_table.scatter_(1, cells, 0.0)
    return update


def decode_table(state: SketchState, bs: BucketState, summed: Tensor) -> Tensor:
    """The estimated sum ``[d]`` (fp32, canonical order) from a summed table, updating the
    sketch-space error and momentum when ``error_feedback="sketch"``."""
    if state.error_feedback == "sketch":
        return sketch_space_step(state, bs, summed)
    update, _ = recover(state, bs, summed)
    return update
