"""Elementwise numpy kernels behind the CPU paths of :mod:`sketchcomm.sketch`: the median over
rows written into preallocated buffers, windows of a vector as a strided view, and the positions
of the largest magnitudes."""

from __future__ import annotations

import numpy as np

__all__ = ["median_rows_into", "sliding_windows", "top_magnitudes"]


def median_rows_into(rows: list[np.ndarray], out: np.ndarray, scratch: np.ndarray) -> None:
    """Write the elementwise median of the 1-D fp32 arrays ``rows`` (each as long as ``out``) into
    ``out``: the numpy twin of :func:`sketchcomm.sketch._median_over_rows`, giving the same values.

    ``scratch`` is fp32 of shape ``[max(3, r), >= len(out)]``; with the ``min``/``max`` networks
    for ``r`` in {1, 2, 3, 5} nothing else is allocated.
    """
    r, n = len(rows), len(out)
    s1, s2, s3 = scratch[0, :n], scratch[1, :n], scratch[2, :n]
    if r == 1:
        np.copyto(out, rows[0])
    elif r == 2:
        np.add(rows[0], rows[1], out=out)
        np.multiply(out, 0.5, out=out)
    elif r == 3:
        a, b, c = rows
        np.minimum(a, b, out=s1)
        np.maximum(a, b, out=s2)
        np.minimum(s2, c, out=s2)
        np.maximum(s1, s2, out=out)
    elif r == 5:
        a, b, c, d, e = rows
        np.minimum(a, b, out=s1)
        np.minimum(c, d, out=s2)
        np.maximum(s1, s2, out=s1)  # low = max(min(a, b), min(c, d))
        np.maximum(a, b, out=s2)
        np.maximum(c, d, out=s3)
        np.minimum(s2, s3, out=s2)  # high = min(max(a, b), max(c, d))
        np.minimum(e, s1, out=s3)  # median3(e, low, high)
        np.maximum(e, s1, out=s1)
        np.minimum(s1, s2, out=s1)
        np.maximum(s3, s1, out=out)
    else:
        stacked = scratch[:r, :n]
        for row, source in zip(stacked, rows, strict=True):
            np.copyto(row, source)
        middle = r // 2
        stacked.partition((middle - 1, middle) if r % 2 == 0 else middle, axis=0)
        if r % 2:
            np.copyto(out, stacked[middle])
        else:
            np.add(stacked[middle - 1], stacked[middle], out=out)
            np.multiply(out, 0.5, out=out)


def sliding_windows(values: np.ndarray, width: int) -> np.ndarray:
    """Read-only view ``[..., n - width + 1, width]`` of the windows of ``width`` consecutive
    elements along the last axis of ``values`` (``[..., n]``)."""
    shape = (*values.shape[:-1], values.shape[-1] - width + 1, width)
    strides = (*values.strides, values.strides[-1])
    return np.lib.stride_tricks.as_strided(values, shape, strides, writeable=False)


def top_magnitudes(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``|values|`` (any order; ties at the ``k``-th broken
    arbitrarily), by introselect instead of a heap."""
    n = len(values)
    if k >= n:
        return np.arange(n)
    return np.argpartition(np.abs(values), n - k)[n - k :]
