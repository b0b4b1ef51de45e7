"""Compiled CPU kernels (numba) for [`CountSketch`][sketchcomm.sketch.CountSketch]: sketching all
rows in one pass over the vector, the median-over-rows estimate straight into the output, the
threshold pass of heavy-hitter selection, and zeroing the cells of selected coordinates.

They compute what the numpy kernels of [`sketchcomm.sketch_numpy`][sketchcomm.sketch_numpy]
compute, bit for bit: every table cell receives ``sigma_j[k] x[k c + l]`` one chunk after the
other in chunk order (the same fp32 additions, since ``t - x == t + (-x)``), and the median over
rows is the same ``min``/``max`` network (``r`` in {3, 5}), mean of two (``r = 2``) or selection
of the middle value(s) of the sorted rows. Coordinate ``i = k c + l`` has row ``j``'s estimate
``sigma_j[k] S[j, (o_jk + l) mod c]``; inside chunk ``k`` the positions ``l`` are cut where a row
wraps around (at ``c - o_jk``), so that every row is read contiguously between two cuts.

The kernels are compiled on first use and cached on disk (``cache=True``), for one signature each:
fp32 C-contiguous vectors and tables, int64 offsets, fp32 signs. When numba is not importable, or
the environment variable ``SKETCHCOMM_KERNELS`` is ``numpy``, [`available()`][
sketchcomm.sketch_compiled.available] is false and the numpy kernels run instead.

>>> import numpy as np
>>> tables = np.zeros((1, 1, 3), dtype=np.float32)
>>> offsets, signs = np.array([[1]]), np.array([[-1.0]], dtype=np.float32)
>>> sketch_block(np.array([[1.0, 2.0, 3.0]], dtype=np.float32), 0, tables, offsets, signs)
>>> tables.tolist()
[[[-3.0, -1.0, -2.0]]]
"""

from __future__ import annotations

import numpy as np

from sketchcomm.compiled import ENVIRONMENT_VARIABLE, available, jit

#: The ``(start, offset)`` rows of the identity placement (coordinate ``i`` at position ``i``).
IDENTITY_PLACEMENT = np.zeros((1, 2), dtype=np.int64)

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "IDENTITY_PLACEMENT",
    "available",
    "estimate_into",
    "estimates_above",
    "estimates_strided",
    "sketch_block",
    "sketch_segments",
    "zero_cells",
]


@jit()
def _add_signed(target, source, sign):
    """``target += sign * source[:len(target)]``."""
    for t in range(len(target)):
        target[t] += sign * source[t]


@jit()
def _add_to_rows(table, starts, signs, source):
    """``table[j, starts[j] + t] += signs[j] * source[t]`` for every row ``j``: 3 and 5 rows in
    one loop that reads ``source`` once, others row by row."""
    n = len(source)
    if len(starts) == 3:
        a, b, c = table[0, starts[0] :], table[1, starts[1] :], table[2, starts[2] :]
        sa, sb, sc = signs[0], signs[1], signs[2]
        for t in range(n):
            v = source[t]
            a[t] += sa * v
            b[t] += sb * v
            c[t] += sc * v
    elif len(starts) == 5:
        a, b, c = table[0, starts[0] :], table[1, starts[1] :], table[2, starts[2] :]
        d, e = table[3, starts[3] :], table[4, starts[4] :]
        sa, sb, sc, sd, se = signs[0], signs[1], signs[2], signs[3], signs[4]
        for t in range(n):
            v = source[t]
            a[t] += sa * v
            b[t] += sb * v
            c[t] += sc * v
            d[t] += sd * v
            e[t] += se * v
    else:
        for j in range(len(starts)):
            _add_signed(table[j, starts[j] : starts[j] + n], source, signs[j])


@jit()
def _sketch_block(x, offset, tables, offsets, signs):
    batch, n = x.shape
    rows, columns = tables.shape[1], tables.shape[2]
    cuts = np.empty(rows + 2, dtype=np.int64)
    starts = np.empty(rows, dtype=np.int64)
    chunk_signs = np.empty(rows, dtype=np.float32)
    position, end = offset, offset + n
    while position < end:
        k = position // columns
        first = position - k * columns
        last = min(columns, end - k * columns)
        base = k * columns - offset
        for j in range(rows):
            chunk_signs[j] = signs[j, k]
        count = _chunk_cuts(offsets, k, last, columns, cuts)
        for m in range(count - 1):
            begin, stop = max(cuts[m], first), cuts[m + 1]
            if stop > begin:
                for j in range(rows):
                    start = offsets[j, k] + begin
                    starts[j] = start - columns if start >= columns else start
                for b in range(batch):
                    _add_to_rows(tables[b], starts, chunk_signs, x[b, base + begin : base + stop])
        position = k * columns + last


def sketch_block(
    x: np.ndarray, offset: int, tables: np.ndarray, offsets: np.ndarray, signs: np.ndarray
) -> None:
    """Add to ``tables`` (``[b, r, c]`` fp32) the sketches of the vectors equal to the rows of
    ``x`` (``[b, n]`` fp32) at coordinates ``offset .. offset + n - 1`` and zero elsewhere, with
    chunk offsets ``offsets`` (``[r, chunks]`` int64) and signs ``signs`` (``[r, chunks]`` fp32);
    one pass over ``x`` for all rows."""
    _sketch_block(x, offset, tables, offsets, signs)


@jit()
def _sketch_segments(flat, starts, positions, lengths, table, offsets, signs):
    tables = table.reshape((1, table.shape[0], table.shape[1]))
    for s in range(len(starts)):
        segment = flat[positions[s] : positions[s] + lengths[s]]
        _sketch_block(segment.reshape((1, lengths[s])), starts[s], tables, offsets, signs)


def sketch_segments(
    flat: np.ndarray,
    starts: np.ndarray,
    positions: np.ndarray,
    lengths: np.ndarray,
    table: np.ndarray,
    offsets: np.ndarray,
    signs: np.ndarray,
) -> None:
    """Add to ``table`` (``[r, c]`` fp32) the sketch of the vector whose coordinates
    ``starts[s] .. starts[s] + lengths[s] - 1`` are ``flat[positions[s] : positions[s] +
    lengths[s]]`` (fp32), segment after segment in order of ``starts`` (int64): the table of
    that vector bit for bit, without building it."""
    _sketch_segments(flat, starts, positions, lengths, table, offsets, signs)


@jit()
def _median_small(values, r):
    """Median of ``values[:r]`` (sorted in place), the mean of the middle two for even ``r``."""
    for i in range(1, r):
        v = values[i]
        m = i - 1
        while m >= 0 and values[m] > v:
            values[m + 1] = values[m]
            m -= 1
        values[m + 1] = v
    if r % 2:
        return values[r // 2]
    return (values[r // 2 - 1] + values[r // 2]) * np.float32(0.5)


@jit()
def _median_of(values, r):
    """The median of ``values[:r]`` by the network ``_segment`` uses for ``r`` in {3, 5}."""
    if r == 3:
        a, b, c = values[0], values[1], values[2]
        return max(min(a, b), min(max(a, b), c))
    if r == 5:
        a, b, c, d, e = values[0], values[1], values[2], values[3], values[4]
        low, high = max(min(a, b), min(c, d)), min(max(a, b), max(c, d))
        return max(min(e, low), min(max(e, low), high))
    return _median_small(values, r)


@jit()
def _segment(table, offsets, signs, k, begin, end, out, scratch, starts):
    """Estimates of positions ``begin .. end - 1`` of chunk ``k`` into ``out[:end - begin]``, for
    a range in which no row wraps around. ``scratch`` (fp32) and ``starts`` (int64) hold ``r``
    elements."""
    rows, columns = table.shape
    n = end - begin
    for j in range(rows):
        start = offsets[j, k] + begin
        starts[j] = start - columns if start >= columns else start
    if rows == 1:
        a, sa = table[0, starts[0] :], signs[0, k]
        for t in range(n):
            out[t] = sa * a[t]
    elif rows == 3:
        a, b, c = table[0, starts[0] :], table[1, starts[1] :], table[2, starts[2] :]
        sa, sb, sc = signs[0, k], signs[1, k], signs[2, k]
        for t in range(n):
            va, vb, vc = sa * a[t], sb * b[t], sc * c[t]
            low = min(va, vb)
            high = min(max(va, vb), vc)
            out[t] = max(low, high)
    elif rows == 5:
        a, b, c = table[0, starts[0] :], table[1, starts[1] :], table[2, starts[2] :]
        d, e = table[3, starts[3] :], table[4, starts[4] :]
        sa, sb, sc, sd, se = signs[0, k], signs[1, k], signs[2, k], signs[3, k], signs[4, k]
        for t in range(n):
            va, vb, vc, vd, ve = sa * a[t], sb * b[t], sc * c[t], sd * d[t], se * e[t]
            low = max(min(va, vb), min(vc, vd))
            high = min(max(va, vb), max(vc, vd))
            out[t] = max(min(ve, low), min(max(ve, low), high))
    elif rows == 2:
        a, b = table[0, starts[0] :], table[1, starts[1] :]
        sa, sb = signs[0, k], signs[1, k]
        for t in range(n):
            out[t] = (sa * a[t] + sb * b[t]) * np.float32(0.5)
    else:
        for t in range(n):
            for j in range(rows):
                scratch[j] = signs[j, k] * table[j, starts[j] + t]
            out[t] = _median_small(scratch, rows)


@jit()
def _chunk_cuts(offsets, k, length, columns, cuts):
    """Sorted positions of chunk ``k`` (``0 = cuts[0] < ... = length``) where a row wraps around;
    returns how many cuts there are."""
    rows = offsets.shape[0]
    count = 0
    cuts[count] = 0
    count += 1
    for j in range(rows):
        wrap = columns - offsets[j, k]
        if 0 < wrap < length:
            cuts[count] = wrap
            count += 1
    cuts[count] = length
    count += 1
    for i in range(2, count - 1):  # insertion sort of the wraps (a generic sort costs more)
        wrap = cuts[i]
        m = i - 1
        while cuts[m] > wrap:
            cuts[m + 1] = cuts[m]
            m -= 1
        cuts[m + 1] = wrap
    return count


@jit()
def _placed(placement, segment, position, stop):
    """For the run of canonical coordinates from ``position`` up to ``stop``: the placement
    segment it starts in (searched from ``segment`` on), where the run ends (``stop``, or where
    the next segment starts) and the buffer position of its first coordinate."""
    while segment + 1 < placement.shape[0] and placement[segment + 1, 0] <= position:
        segment += 1
    if segment + 1 < placement.shape[0]:
        stop = min(stop, placement[segment + 1, 0])
    return segment, stop, placement[segment, 1] + position - placement[segment, 0]


@jit()
def _estimate_into(table, offsets, signs, dim, out, placement):
    rows, columns = table.shape
    cuts = np.empty(rows + 2, dtype=np.int64)
    scratch = np.empty(rows, dtype=np.float32)
    starts = np.empty(rows, dtype=np.int64)
    segment = 0
    for k in range(offsets.shape[1]):
        count = _chunk_cuts(offsets, k, min(columns, dim - k * columns), columns, cuts)
        for m in range(count - 1):
            begin = cuts[m]
            while begin < cuts[m + 1]:  # cut again where a placement segment starts
                position = k * columns + begin
                segment, stop, at = _placed(placement, segment, position, k * columns + cuts[m + 1])
                end = stop - k * columns
                _segment(table, offsets, signs, k, begin, end, out[at:], scratch, starts)
                begin = end


def estimate_into(
    table: np.ndarray,
    offsets: np.ndarray,
    signs: np.ndarray,
    dim: int,
    out: np.ndarray,
    placement: np.ndarray = IDENTITY_PLACEMENT,
) -> None:
    """Write the median-over-rows estimate of the ``dim`` coordinates from ``table`` (``[r, c]``
    fp32) into ``out`` (fp32): coordinate ``i`` of segment ``s`` at ``out[placement[s, 1] + i -
    placement[s, 0]]``, with ``placement`` the ``[s, 2]`` int64 ``(start, offset)`` rows of a
    [`Placement`][sketchcomm.placement.Placement] (by default ``out[i]``)."""
    _estimate_into(table, offsets, signs, dim, out, placement)


@jit()
def _estimates_above(
    table, offsets, signs, dim, threshold, block, found_indices, found_values, dense, placement
):
    rows, columns = table.shape
    cuts = np.empty(rows + 2, dtype=np.int64)
    scratch = np.empty(rows, dtype=np.float32)
    starts = np.empty(rows, dtype=np.int64)
    capacity = len(found_indices)
    found, segment = 0, 0
    for k in range(offsets.shape[1]):
        count = _chunk_cuts(offsets, k, min(columns, dim - k * columns), columns, cuts)
        for m in range(count - 1):
            begin = cuts[m]
            while begin < cuts[m + 1]:
                position = k * columns + begin
                limit = k * columns + min(cuts[m + 1], begin + len(block))
                segment, stop, at = _placed(placement, segment, position, limit)
                end = stop - k * columns
                target = dense[at:] if len(dense) else block
                _segment(table, offsets, signs, k, begin, end, target, scratch, starts)
                for t in range(end - begin):
                    value = target[t]
                    if abs(value) >= threshold:
                        if found < capacity:
                            found_indices[found] = position + t
                            found_values[found] = value
                        found += 1
                    else:
                        target[t] = 0.0
                begin = end
    return found


def estimates_above(
    table: np.ndarray,
    offsets: np.ndarray,
    signs: np.ndarray,
    dim: int,
    threshold: float,
    capacity: int,
    dense: np.ndarray | None = None,
    placement: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All coordinates whose ``|estimate| >= threshold`` and their estimates, in one pass; at
    most ``capacity`` are kept, but the count is exact: where it exceeds ``capacity`` the pass is
    repeated with room for all. With ``dense`` (fp32) the estimates at or above the threshold are
    also written there, and zeros elsewhere; else no ``[dim]`` vector is made. ``placement``
    (``[s, 2]`` int64, rows ``(start, position)`` by increasing ``start``, the first 0) writes
    coordinates ``start ..`` up to the next segment's start at ``dense[position ..]``; by default
    coordinate ``i`` goes to ``dense[i]``."""
    block = np.empty(min(dim, 4096), dtype=np.float32)
    target = np.empty(0, dtype=np.float32) if dense is None else dense
    segments = IDENTITY_PLACEMENT if placement is None else placement
    limit = np.float32(threshold)
    while True:
        indices = np.empty(capacity, dtype=np.int64)
        values = np.empty(capacity, dtype=np.float32)
        found = _estimates_above(
            table, offsets, signs, dim, limit, block, indices, values, target, segments
        )
        if found <= capacity:
            return indices[:found], values[:found]
        capacity = found


@jit()
def _zero_cells(table, other, offsets, indices):
    rows, columns = table.shape
    both = other.size > 0
    for i in indices:
        k = i // columns
        position = i - k * columns
        for j in range(rows):
            cell = offsets[j, k] + position
            cell = cell - columns if cell >= columns else cell
            table[j, cell] = 0.0
            if both:
                other[j, cell] = 0.0


def zero_cells(
    table: np.ndarray, offsets: np.ndarray, indices: np.ndarray, other: np.ndarray | None = None
) -> None:
    """Set to zero the cells of ``table`` (``[r, c]`` fp32) that the coordinates ``indices``
    (int64) hash to, one per row, and the same cells of ``other`` (like ``table``) if given."""
    second = np.empty((0, 0), dtype=np.float32) if other is None else other
    _zero_cells(table, second, offsets, indices)


@jit()
def _estimates_strided(table, offsets, signs, dim, stride, out):
    rows, columns = table.shape
    scratch = np.empty(rows, dtype=np.float32)
    n = 0
    for k in range(offsets.shape[1]):
        base = k * columns
        for i in range(-(-base // stride) * stride, min(base + columns, dim), stride):
            position = i - base
            for j in range(rows):
                cell = offsets[j, k] + position
                scratch[j] = signs[j, k] * table[j, cell - columns if cell >= columns else cell]
            out[n] = _median_of(scratch, rows)
            n += 1


def estimates_strided(
    table: np.ndarray, offsets: np.ndarray, signs: np.ndarray, dim: int, stride: int
) -> np.ndarray:
    """The estimates of coordinates ``0, stride, 2 stride, ... < dim`` (fp32)."""
    out = np.empty(-(-dim // stride), dtype=np.float32)
    _estimates_strided(table, offsets, signs, dim, stride, out)
    return out
