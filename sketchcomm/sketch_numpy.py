"""The estimation kernels behind [`sketchcomm.sketch.CountSketch`][sketchcomm.sketch.CountSketch]:
the median over rows (torch, for any device, and its numpy twin written into preallocated buffers),
windows of a vector as a strided view, the positions of the largest magnitudes, and the blocked walk
over a CPU table that estimates coordinates without a ``d``-element temporary.

>>> import torch
>>> median_over_rows([torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.0]), torch.tensor([3.0, 1.0])])
tensor([2., 1.])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sketchcomm import sketch_compiled

if TYPE_CHECKING:
    from sketchcomm.sketch import CountSketch

__all__ = [
    "CPU_BLOCK",
    "cpu_blocks",
    "cpu_scratch",
    "estimates_at_least",
    "median_over_rows",
    "median_rows_into",
    "selection_threshold",
    "sketch_grouped",
    "sliding_windows",
    "top_magnitudes",
]

# Elements of one chunk whose median is computed per numpy call on the CPU: the row windows and
# scratch of a block (``(r + 3) * 4 * CPU_BLOCK`` bytes) stay in the L2 cache.
CPU_BLOCK = 1 << 15
# Largest signed, doubled table (``16 r c`` bytes) that estimation builds: below glibc's largest
# mmap threshold (32 MiB), so its memory is reused from call to call instead of faulted in anew.
_MAX_DOUBLED_TABLE_BYTES = 16 << 20
# Strided sample of estimates from which heavy-hitter selection on the CPU sets its threshold.
_THRESHOLD_SAMPLE = 1 << 16
# Fewest whole chunks per block for which
# [`sketch_grouped()`][sketchcomm.sketch_numpy.sketch_grouped] gathers them: a gathered group
# costs about three passes over it against one for slicing, and saves two numpy calls per chunk and
# row. Estimation gathers from two chunks per block on (it saves a whole median per chunk).
_MIN_SKETCH_GROUP = 8


def _median3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def median_over_rows(rows: list[Tensor]) -> Tensor:
    """Elementwise median of ``r`` equally shaped tensors (the mean of the middle two if ``r`` is
    even), with ``min``/``max`` networks for the common small ``r``."""
    r = len(rows)
    if r == 1:
        return rows[0]
    if r == 2:
        return (rows[0] + rows[1]) * 0.5
    if r == 3:
        return _median3(*rows)
    if r == 5:
        a, b, c, d, e = rows
        low = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))
        high = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
        return _median3(e, low, high)
    stacked = torch.stack(rows)
    if r % 2:
        return stacked.median(dim=0).values
    middle = stacked.sort(dim=0).values[r // 2 - 1 : r // 2 + 1]
    return middle.mean(dim=0)


def median_rows_into(rows: list[np.ndarray], out: np.ndarray, scratch: np.ndarray) -> None:
    """Write the elementwise median of the 1-D fp32 arrays ``rows`` (each as long as ``out``) into
    ``out``: the numpy twin of [`median_over_rows()`][sketchcomm.sketch_numpy.median_over_rows],
    giving the same values.

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


def sketch_grouped(sketch: CountSketch, x: np.ndarray, tables: np.ndarray) -> int:
    """With ``c <= CPU_BLOCK / 8``, add the whole chunks of ``x`` (``[b, d]``) to ``tables``
    (``[b, r, c]``) ``CPU_BLOCK // c`` chunks at a time: gather each chunk's rotation for a
    row, ``R[k, m] = sigma_j[k] x[k c + (m - o_jk) mod c]``, and add ``S_j + R[0] + R[1] + ...``
    left to right (numpy reduces a non-contiguous axis in order). Returns the first chunk
    left for the sliced path: all of them when ``c`` is large, else the last partial one."""
    c = sketch.columns
    group = CPU_BLOCK // c
    if group < _MIN_SKETCH_GROUP:
        return 0
    batch, whole = len(x), sketch.dim // c
    for first in range(0, whole, group):
        count = min(group, whole - first)
        chunks = x[:, first * c : (first + count) * c].reshape(batch, count, c)
        doubled = np.concatenate((chunks, chunks), axis=2).reshape(batch, -1)
        windows = sliding_windows(doubled, c)
        base = np.arange(count) * (2 * c)
        for j in range(sketch.rows):
            starts = base + sketch.rotation_starts[j, first : first + count]
            rotated = windows[:, starts]
            rotated *= sketch.chunk_signs[j, first : first + count, None]
            rotated[:, 0] += tables[:, j]
            np.add.reduce(rotated, axis=1, out=tables[:, j])
    return whole


def selection_threshold(sketch: CountSketch, table: Tensor, k: int) -> float | None:
    """A magnitude exceeded by about ``1.5 k + 4 sqrt(k)`` of the estimates from ``table``, read
    from a strided sample; ``None`` where the sample is too small to be worth it (the caller then
    selects from the whole estimate)."""
    stride = sketch.dim // _THRESHOLD_SAMPLE
    if stride < 4:
        return None
    if sketch_compiled.available():
        tn = table.contiguous().numpy()
        estimates = sketch_compiled.estimates_strided(
            tn, sketch.offsets_cpu, sketch.chunk_signs, sketch.dim, stride
        )
        magnitudes = np.abs(estimates)
    else:
        magnitudes = sketch.estimate_at(table, torch.arange(0, sketch.dim, stride)).abs().numpy()
    expected = k / sketch.dim * len(magnitudes)
    rank = math.ceil(1.5 * expected + 4 * math.sqrt(expected) + 8)
    if rank >= len(magnitudes) // 4:
        return None
    position = len(magnitudes) - rank
    return float(np.partition(magnitudes, position)[position])


def top_magnitudes(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``|values|`` (any order), ties at the ``k``-th magnitude
    going to the lowest positions: the ``k``-th magnitude by introselect of the magnitudes (no
    index array to carry along), then one comparison pass."""
    n = len(values)
    if k >= n:
        return np.arange(n)
    magnitudes = np.abs(values)
    kth = np.partition(magnitudes, n - k)[n - k]
    above = np.flatnonzero(magnitudes > kth)
    if len(above) == k:
        return above
    ties = np.flatnonzero(magnitudes == kth)[: k - len(above)]
    return np.concatenate((above, ties))


def cpu_blocks(sketch: CountSketch, table: Tensor) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Consecutive blocks of coordinates of a CPU table: ``(start, windows)`` where
    ``windows[j]`` holds row ``j``'s estimates ``s_j(i) S[j, h_j(i)]`` of the coordinates
    ``i = start, start + 1, ...``, at most ``len(cpu_scratch(sketch)[0])`` of them.

    Up to [`_MAX_DOUBLED_TABLE_BYTES`][sketchcomm.sketch_numpy._MAX_DOUBLED_TABLE_BYTES], the
    windows are views of the signed, doubled table ``[S_j, S_j, -S_j, -S_j]``: a block lies in one
    chunk, or with ``c <= CPU_BLOCK / 2`` holds ``CPU_BLOCK // c`` whole chunks whose windows are
    gathered (so that the number of numpy calls does not grow with the number of chunks). A larger
    doubled table would cost a fresh allocation per call, so instead blocks also end where a row's
    window wraps around, and the windows are views of ``S_j`` or of ``-S_j`` (``r c`` elements
    copied).
    """
    c = sketch.columns
    if sketch.rows * 4 * c * 4 > _MAX_DOUBLED_TABLE_BYTES:
        yield from _cpu_blocks_split(sketch, table.contiguous().numpy())
        return
    signed = np.empty((sketch.rows, 4 * c), dtype=np.float32)
    signed[:, :c] = table.numpy()
    signed[:, c : 2 * c] = signed[:, :c]
    np.negative(signed[:, :c], out=signed[:, 2 * c : 3 * c])
    signed[:, 3 * c :] = signed[:, 2 * c : 3 * c]
    group = CPU_BLOCK // c
    whole_chunks_gathered = sketch.dim // c if group >= 2 else 0
    if whole_chunks_gathered:
        windows = [sliding_windows(row, c) for row in signed]
        for first in range(0, whole_chunks_gathered, group):
            last = min(first + group, whole_chunks_gathered)
            starts = sketch.gather_starts_cpu[:, first:last]
            yield first * c, [w[g].reshape(-1) for w, g in zip(windows, starts, strict=True)]
    for k in range(whole_chunks_gathered, sketch.chunks):
        starts = sketch.gather_starts_cpu[:, k].tolist()
        length = min(c, sketch.dim - k * c)
        for begin in range(0, length, CPU_BLOCK):
            end = min(length, begin + CPU_BLOCK)
            yield k * c + begin, [signed[j, g + begin : g + end] for j, g in enumerate(starts)]


def _cpu_blocks_split(
    sketch: CountSketch, positive: np.ndarray
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """[`cpu_blocks()`][sketchcomm.sketch_numpy.cpu_blocks] from ``S`` (``positive``) and ``-S``
    alone, with blocks cut where
    a row's window wraps around."""
    c = sketch.columns
    negative = np.negative(positive)
    for k in range(sketch.chunks):
        length = min(c, sketch.dim - k * c)
        offsets = [sketch.offsets_list[j][k] for j in range(sketch.rows)]
        sources = [
            positive[j] if sketch.signs_list[j][k] > 0 else negative[j] for j in range(sketch.rows)
        ]
        wraps = {c - offset for offset in offsets if 0 < c - offset < length}
        cuts = sorted(wraps.union(range(0, length, CPU_BLOCK), (length,)))
        for begin, end in itertools.pairwise(cuts):
            yield (
                k * c + begin,
                [
                    source[(offset + begin) % c : (offset + begin) % c + end - begin]
                    for source, offset in zip(sources, offsets, strict=True)
                ],
            )


def cpu_scratch(sketch: CountSketch) -> np.ndarray:
    """``[max(3, r), block]`` fp32 scratch for the median of one of
    [`cpu_blocks()`][sketchcomm.sketch_numpy.cpu_blocks]."""
    c = sketch.columns
    block = CPU_BLOCK if c >= CPU_BLOCK else c * max(1, CPU_BLOCK // c)
    return np.empty((max(3, sketch.rows), block), dtype=np.float32)


def estimates_at_least(
    sketch: CountSketch, table: Tensor, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """All coordinates whose ``|estimate| >= threshold`` and their estimates, in one blocked
    pass over a CPU table (no ``[dim]`` vector is made)."""
    scratch = cpu_scratch(sketch)
    estimate = np.empty(scratch.shape[1], dtype=np.float32)
    magnitude = np.empty_like(estimate)
    mask = np.empty(scratch.shape[1], dtype=bool)
    found_indices, found_values = [], []
    for start, windows in cpu_blocks(sketch, table):
        n = len(windows[0])
        median_rows_into(windows, estimate[:n], scratch)
        np.abs(estimate[:n], out=magnitude[:n])
        np.greater_equal(magnitude[:n], threshold, out=mask[:n])
        hits = np.flatnonzero(mask[:n])
        if len(hits):
            found_indices.append(hits + start)
            found_values.append(estimate[hits])
    if not found_indices:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    return np.concatenate(found_indices), np.concatenate(found_values)
