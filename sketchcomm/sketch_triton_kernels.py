"""The Triton kernels behind [`sketchcomm.sketch_triton`][sketchcomm.sketch_triton] (this module
needs ``triton``; that one imports it only where Triton is installed).

Each program works on a block of coordinates or of table columns with the hashes of
[`CountSketch`][sketchcomm.sketch.CountSketch]: coordinate ``i = k c + l`` of row ``j`` goes to
column ``(o_jk + l) mod c`` with sign ``sigma_j[k]``; ``offsets`` (int32) and ``signs`` (fp32) are
the ``[r, n]`` arrays of ``o_jk`` and ``sigma_j[k]``, row-major.
"""

import triton
import triton.language as tl

__all__ = ["compact_kernel", "estimate_kernel", "sketch_atomic_kernel", "sketch_rows_kernel"]


@triton.jit
def _row_estimate(table, offsets, signs, j, k, position, mask, columns, chunks):
    """``sigma_j[k] S[j, (o_jk + l) mod c]`` for (broadcast) row ``j``, chunk ``k``,
    position ``l``."""
    offset = tl.load(offsets + j * chunks + k, mask=mask, other=0)
    sign = tl.load(signs + j * chunks + k, mask=mask, other=1.0)
    column = offset + position
    column = tl.where(column >= columns, column - columns, column)
    return tl.load(table + j * columns + column, mask=mask, other=0.0) * sign


@triton.jit
def _median3(a, b, c):
    return tl.maximum(tl.minimum(a, b), tl.minimum(tl.maximum(a, b), c))


@triton.jit
def _median_estimate(
    table, offsets, signs, i, mask, columns, chunks, ROWS: tl.constexpr, ROWS_P2: tl.constexpr
):
    """Median over the ``ROWS`` rows of the estimates of coordinates ``i`` (``[BLOCK]``),
    with the networks of ``sketchcomm.sketch_numpy.median_over_rows``."""
    k = i // columns
    position = i - k * columns
    if ROWS == 1:
        estimate = _row_estimate(table, offsets, signs, 0, k, position, mask, columns, chunks)
    elif ROWS == 2:
        a = _row_estimate(table, offsets, signs, 0, k, position, mask, columns, chunks)
        b = _row_estimate(table, offsets, signs, 1, k, position, mask, columns, chunks)
        estimate = (a + b) * 0.5
    elif ROWS == 3:
        a = _row_estimate(table, offsets, signs, 0, k, position, mask, columns, chunks)
        b = _row_estimate(table, offsets, signs, 1, k, position, mask, columns, chunks)
        c = _row_estimate(table, offsets, signs, 2, k, position, mask, columns, chunks)
        estimate = _median3(a, b, c)
    elif ROWS == 5:
        a = _row_estimate(table, offsets, signs, 0, k, position, mask, columns, chunks)
        b = _row_estimate(table, offsets, signs, 1, k, position, mask, columns, chunks)
        c = _row_estimate(table, offsets, signs, 2, k, position, mask, columns, chunks)
        d = _row_estimate(table, offsets, signs, 3, k, position, mask, columns, chunks)
        e = _row_estimate(table, offsets, signs, 4, k, position, mask, columns, chunks)
        low = tl.maximum(tl.minimum(a, b), tl.minimum(c, d))
        high = tl.minimum(tl.maximum(a, b), tl.maximum(c, d))
        estimate = _median3(e, low, high)
    else:
        # [BLOCK, ROWS_P2] estimates (the padding columns are not rows).
        rows = tl.arange(0, ROWS_P2)[None, :]
        valid = rows < ROWS
        values = _row_estimate(
            table,
            offsets,
            signs,
            rows,
            k[:, None],
            position[:, None],
            mask[:, None] & valid,
            columns,
            chunks,
        )
        # Row a's rank: the rows below it, and the equal ones before it (a tie-broken order).
        # The estimate is the value of rank ROWS // 2 (and of ROWS // 2 - 1 for even ROWS).
        upper = tl.zeros_like(k).to(tl.float32)
        lower = tl.zeros_like(k).to(tl.float32)
        for a in tl.static_range(ROWS):
            value = tl.sum(tl.where(rows == a, values, 0.0), axis=1)
            below = (values < value[:, None]) | ((values == value[:, None]) & (rows < a))
            rank = tl.sum((below & valid).to(tl.int32), axis=1)
            upper = tl.where(rank == ROWS // 2, value, upper)
            lower = tl.where(rank == ROWS // 2 - 1, value, lower)
        estimate = upper
        if ROWS % 2 == 0:
            estimate = (lower + upper) * 0.5
    return estimate


@triton.jit
def sketch_rows_kernel(
    x,
    tables,
    offsets,
    signs,
    start,
    stop,
    rows,
    columns,
    chunks,
    blocks,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Program ``(b, j, block)``: cells ``m`` of row ``j`` of table ``b`` receive
    ``sigma_j[k] v[k c + (m - o_jk) mod c]`` for the chunks ``k`` that meet ``[start, stop)``, in
    order, where ``v[i] = x[b, i - start]`` on ``[start, stop)`` (``x`` is ``[b, stop - start]``)
    and zero elsewhere."""
    pid = tl.program_id(0).to(tl.int64)
    block = pid % blocks
    row_of_batch = pid // blocks
    j = row_of_batch % rows
    batch = row_of_batch // rows
    m = block * BLOCK + tl.arange(0, BLOCK)
    in_row = m < columns
    cells = tables + row_of_batch * columns + m
    total = tl.load(cells, mask=in_row, other=0.0)
    source = x + batch * (stop - start) - start
    for first in range(start // columns, (stop - 1) // columns + 1, UNROLL):
        # Straight-line code: the UNROLL loads do not depend on ``total`` and are issued
        # together; the additions stay in chunk order. Past the last chunk, ``i >= stop``.
        for u in tl.static_range(UNROLL):
            k = first + u
            hashed = j * chunks + tl.minimum(k, chunks - 1)
            offset = tl.load(offsets + hashed)
            sign = tl.load(signs + hashed)
            position = m - offset
            position = tl.where(position < 0, position + columns, position)
            i = k * columns + position
            valid = in_row & (i >= start) & (i < stop)
            term = tl.load(source + i, mask=valid, other=0.0) * sign
            total = tl.where(valid, total + term, total)
    tl.store(cells, total, mask=in_row)


@triton.jit
def sketch_atomic_kernel(
    x,
    tables,
    offsets,
    signs,
    start,
    stop,
    columns,
    chunks,
    blocks,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``(b, block)``: coordinates ``i`` in ``[start, stop)`` add
    ``sigma_j[k] x[b, i - start]`` to cell ``(o_jk + l) mod c`` of every row ``j`` of table ``b``
    with ``tl.atomic_add``."""
    pid = tl.program_id(0).to(tl.int64)
    block = pid % blocks
    batch = pid // blocks
    i = start + block * BLOCK + tl.arange(0, BLOCK)
    mask = i < stop
    value = tl.load(x + batch * (stop - start) + (i - start), mask=mask, other=0.0)
    k = i // columns
    position = i - k * columns
    table = tables + batch * ROWS * columns
    for j in tl.static_range(ROWS):
        offset = tl.load(offsets + j * chunks + k, mask=mask, other=0)
        sign = tl.load(signs + j * chunks + k, mask=mask, other=0.0)
        column = offset + position
        column = tl.where(column >= columns, column - columns, column)
        tl.atomic_add(table + j * columns + column, value * sign, mask=mask, sem="relaxed")


@triton.jit
def estimate_kernel(
    table,
    offsets,
    signs,
    out,
    count,
    stride,
    columns,
    chunks,
    ROWS: tl.constexpr,
    ROWS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[p]`` = median estimate of coordinate ``p * stride``, for ``p < count``."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < count
    estimate = _median_estimate(
        table, offsets, signs, p * stride, mask, columns, chunks, ROWS, ROWS_P2
    )
    tl.store(out + p, estimate, mask=mask)


@triton.jit
def compact_kernel(
    table,
    offsets,
    signs,
    threshold,
    counter,
    indices,
    values,
    dim,
    capacity,
    columns,
    chunks,
    ROWS: tl.constexpr,
    ROWS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Append every coordinate ``i`` with ``|estimate| >= threshold`` (or a NaN) and its
    estimate at slot ``counter++`` of ``indices``/``values`` while the slot is below
    ``capacity``; ``counter`` ends as the number of such coordinates."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < dim
    estimate = _median_estimate(table, offsets, signs, i, mask, columns, chunks, ROWS, ROWS_P2)
    level = tl.load(threshold)
    magnitude = tl.abs(estimate)
    hit = mask & ~(magnitude < level)  # true where either is a NaN
    hits = hit.to(tl.int32)
    found = tl.sum(hits, axis=0)
    first = tl.atomic_add(counter, found, mask=found > 0, sem="relaxed")
    slot = first + tl.cumsum(hits, axis=0) - 1
    keep = hit & (slot < capacity)
    tl.store(indices + slot, i, mask=keep)
    tl.store(values + slot, estimate, mask=keep)
