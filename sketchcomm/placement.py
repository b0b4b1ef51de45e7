"""Where the coordinates of a vector lie in a flat buffer that holds them in another order.

A DDP bucket's buffer holds its parameters in the bucket's own order, while the sketch hashes the
bucket's *canonical* vector (see [`sketchcomm.buckets`][sketchcomm.buckets]). A
[`Placement`][sketchcomm.placement.Placement] maps one to the other segment by segment, so that
kernels can read the canonical vector from the buffer, and write a result over the buffer, without
building the canonical vector in a ``d``-element copy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["Placement"]


class Placement:
    """Segment ``s`` of a canonical vector of ``numel`` elements, its coordinates ``starts[s] ..
    starts[s] + lengths[s] - 1``, lies at positions ``offsets[s] .. offsets[s] + lengths[s] - 1``
    of a flat buffer; the segments cover the canonical vector one after the other.

    ``slices`` lists the ``(offset, length)`` of each segment in canonical order, as
    [`BucketLayout.slices`][sketchcomm.buckets.BucketLayout] does; None places the canonical
    vector at the start of the buffer in its own order (the identity).

    >>> placement = Placement(((3, 2), (0, 3)), 5)  # canonical [a, b, c, d, e] as [c, d, e, a, b]
    >>> flat = torch.arange(5.0)
    >>> placement.gather(flat).tolist(), placement.positions(np.array([0, 4])).tolist()
    ([3.0, 4.0, 0.0, 1.0, 2.0], [3, 2])
    >>> placement.scatter(placement.gather(flat), torch.empty(5)).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
    >>> buffer = np.zeros(5, dtype=np.float32)
    >>> placement.place(1, np.array([1.0, 2.0, 3.0], dtype=np.float32), buffer)  # b, c, d
    >>> buffer.tolist()
    [2.0, 3.0, 0.0, 0.0, 1.0]
    """

    def __init__(self, slices: tuple[tuple[int, int], ...] | None, numel: int) -> None:
        pairs = ((0, numel),) if slices is None else slices
        self.numel = numel
        self.offsets = np.array([offset for offset, _ in pairs], dtype=np.int64)
        self.lengths = np.array([length for _, length in pairs], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)
        if int(self.lengths.sum()) != numel:
            raise ValueError(f"the slices hold {int(self.lengths.sum())} elements, not {numel}")
        #: One past the last buffer position the placement uses.
        self.extent = int((self.offsets + self.lengths).max())
        #: ``[s, 2]`` int64 rows ``(start, offset)``, what the compiled kernels read.
        self.pairs = np.ascontiguousarray(np.stack((self.starts, self.offsets), axis=1))
        #: True when canonical coordinate ``i`` is buffer position ``i`` for every ``i``.
        self.is_identity = bool((self.offsets == self.starts).all())

    def segments(self) -> list[tuple[int, int, int]]:
        """``(start, offset, length)`` of every segment, in canonical order."""
        return list(
            zip(self.starts.tolist(), self.offsets.tolist(), self.lengths.tolist(), strict=True)
        )

    def positions(self, indices: np.ndarray) -> np.ndarray:
        """Buffer positions (int64) of the canonical coordinates ``indices`` (int64)."""
        if self.is_identity:
            return indices
        segment = np.searchsorted(self.starts, indices, side="right") - 1
        return self.offsets[segment] + (indices - self.starts[segment])

    def place(self, start: int, values: np.ndarray, flat: np.ndarray) -> None:
        """Write ``values``, the canonical coordinates ``start, start + 1, ...``, at their
        positions in ``flat`` (both 1-D numpy arrays)."""
        end = start + len(values)
        segment = int(np.searchsorted(self.starts, start, side="right")) - 1
        while segment < len(self.starts) and self.starts[segment] < end:
            first, offset = int(self.starts[segment]), int(self.offsets[segment])
            low, high = max(first, start), min(first + int(self.lengths[segment]), end)
            flat[offset + low - first : offset + high - first] = values[low - start : high - start]
            segment += 1

    def gather(self, flat: Tensor) -> Tensor:
        """The canonical vector ``[numel]`` read from ``flat`` (``flat`` itself, or its first
        ``numel`` elements, for the identity; else a new vector)."""
        if self.is_identity:
            return flat[: self.numel]
        return torch.cat([flat[o : o + n] for _, o, n in self.segments()])

    def scatter(self, canonical: Tensor, flat: Tensor) -> Tensor:
        """Write the canonical vector ``canonical`` (``[numel]``) into ``flat`` at its positions;
        returns ``flat``."""
        for start, offset, length in self.segments():
            flat[offset : offset + length] = canonical[start : start + length]
        return flat
