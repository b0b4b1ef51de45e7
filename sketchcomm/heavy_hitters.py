"""Heavy-hitter selection from a Count Sketch table: the ``k`` coordinates with the largest
estimated magnitude, behind [`CountSketch.heavy_hitters()`][sketchcomm.sketch.CountSketch].

On the CPU, for a finite table, a threshold ``t`` is read from a strided sample of estimates (about
``1.5 k`` expected above it); one pass keeps the coordinates with ``|estimate| >= t`` and, if at
least ``k``, an exact selection (introselect) picks among them, else among the whole estimate. The
result is the same set as ``torch.topk`` of the estimate's magnitudes, up to ties at the ``k``-th.
With an ``out`` vector the top-``k`` vector (zero elsewhere) is written into it, with the compiled
kernels during that pass; a [`Placement`][sketchcomm.placement.Placement] writes it in another
order (a bucket buffer's), coordinate ``i`` at ``placement.positions(i)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sketchcomm import sketch_compiled, sketch_triton
from sketchcomm.finite import tensor_is_finite
from sketchcomm.placement import Placement
from sketchcomm.sketch_numpy import (
    estimates_at_least,
    selection_threshold,
    top_magnitudes,
)

if TYPE_CHECKING:
    from sketchcomm.sketch import CountSketch

__all__ = ["select_heavy_hitters"]


def select_heavy_hitters(
    sketch: CountSketch,
    table: Tensor,
    k: int,
    out: Tensor | None = None,
    placement: Placement | None = None,
) -> tuple[Tensor, Tensor]:
    """``([k] int64, [k] fp32)``: the canonical indices and estimates of the ``k`` largest
    estimated magnitudes of ``table`` (``[r, c]`` fp32) under ``sketch``, in no particular order.
    With ``out`` (contiguous fp32, ``[dim]``, or a buffer holding ``placement``'s positions) the
    estimates of those coordinates are written at their positions (``placement``'s, by default
    their indices) and zeros at every other position of the placement (all of ``out`` without
    one).

    >>> from sketchcomm.sketch import CountSketch
    >>> sketch = CountSketch(dim=6, rows=1, columns=7)
    >>> table = sketch.sketch(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 0.0]))
    >>> out = torch.empty(6)
    >>> _ = select_heavy_hitters(sketch, table, 1, out, Placement(((2, 4), (0, 2)), 6))
    >>> out.tolist()  # canonical coordinate 4 is buffer position 0
    [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if table.device.type == "cpu" and tensor_is_finite(table):
        threshold = selection_threshold(sketch, table, k)
        if threshold is not None:
            fused = out is not None and sketch_compiled.available()
            indices, values = _estimates_at_least(
                sketch, table, threshold, k, out.numpy() if fused else None, placement
            )
            if len(indices) >= k:
                keep = top_magnitudes(values, k)
                chosen = torch.from_numpy(indices[keep]), torch.from_numpy(values[keep])
                if not fused:
                    return _written(chosen, out, placement)
                dropped = np.ones(len(indices), dtype=bool)
                dropped[keep] = False
                out.numpy()[_positions(indices[dropped], placement)] = 0.0
                return chosen
        estimates = sketch.estimate(table)
        indices = torch.from_numpy(top_magnitudes(estimates.numpy(), k))
        return _written((indices, estimates[indices]), out, placement)
    if sketch_triton.supported(table):
        chosen = sketch_triton.heavy_hitters(sketch, table.contiguous(), k)
        return _written(chosen, out, placement)
    estimates = sketch.estimate(table)
    indices = estimates.abs().topk(k, sorted=False).indices
    return _written((indices, estimates[indices]), out, placement)


def _positions(indices: np.ndarray, placement: Placement | None) -> np.ndarray:
    return indices if placement is None else placement.positions(indices)


def _estimates_at_least(
    sketch: CountSketch,
    table: Tensor,
    threshold: float,
    k: int,
    dense: np.ndarray | None,
    placement: Placement | None,
) -> tuple[np.ndarray, np.ndarray]:
    if sketch_compiled.available():
        return sketch_compiled.estimates_above(
            table.contiguous().numpy(),
            sketch.offsets_cpu,
            sketch.chunk_signs,
            sketch.dim,
            threshold,
            capacity=2 * k + 64,
            dense=dense,
            placement=None if placement is None else placement.pairs,
        )
    return estimates_at_least(sketch, table, threshold)


def _written(
    chosen: tuple[Tensor, Tensor], out: Tensor | None, placement: Placement | None
) -> tuple[Tensor, Tensor]:
    """``chosen = (indices, values)``, after writing them into ``out`` (zero elsewhere) if given."""
    if out is not None:
        indices, values = chosen
        if placement is None:
            out.zero_()
        else:
            for _, offset, length in placement.segments():
                out[offset : offset + length] = 0.0
            positions = placement.positions(indices.cpu().numpy())
            indices = torch.from_numpy(positions).to(indices.device)
        out[indices] = values
    return chosen
