"""Sketching a block of consecutive coordinates at an offset, for every row of a batch.

A bucket holds several parameters one after the other; by linearity of the Count Sketch, the
sketch of the bucket's vector is the sum of the sketches of its parameters' blocks, each placed at
its offset (zero elsewhere). [`sketch_block_into()`][sketchcomm.sketch_blocks.sketch_block_into]
adds one such block's sketch to a batch of tables without building the bucket's vector, so
per-example gradients can be sketched parameter by parameter as they are computed, and
[`sketch_placed()`][sketchcomm.sketch_blocks.sketch_placed] sketches a bucket's canonical vector
straight from the bucket buffer, segment by segment.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sketchcomm import sketch_compiled, sketch_triton
from sketchcomm.placement import Placement
from sketchcomm.sketch import CountSketch

__all__ = ["sketch_block_into", "sketch_placed"]


def sketch_block_into(sketch: CountSketch, block: Tensor, offset: int, tables: Tensor) -> Tensor:
    """Add to ``tables`` (``[batch, rows, columns]`` fp32, on the sketch's device) the sketches
    under ``sketch`` of the vectors that equal the rows of ``block`` (``[batch, n]``) at
    coordinates ``offset .. offset + n - 1`` and are zero elsewhere; returns ``tables``.

    Coordinate ``i = k c + l`` goes to column ``(o_jk + l) mod c`` of row ``j`` with sign
    ``sigma_j[k]`` (see [`sketchcomm.sketch`][sketchcomm.sketch]), so the block is added chunk by
    chunk, one (possibly wrapped) slice per chunk and row. Sketching the consecutive blocks of a
    vector one after the other gives its sketch, up to the order of fp32 additions.

    >>> sketch = CountSketch(dim=10, rows=2, columns=5, seed=0)
    >>> x = torch.randn(3, 10)
    >>> tables = torch.zeros(3, 2, 5)
    >>> _ = sketch_block_into(sketch, x[:, :4], 0, tables)
    >>> _ = sketch_block_into(sketch, x[:, 4:], 4, tables)
    >>> torch.allclose(tables, sketch.sketch_batch(x))
    True
    """
    if block.dim() != 2 or not 0 <= offset <= sketch.dim - block.shape[1]:
        raise ValueError(
            f"expected a [batch, n] block with offset + n <= {sketch.dim}, got "
            f"{tuple(block.shape)} at offset {offset}"
        )
    shape = (len(block), *sketch.table_shape)
    if tuple(tables.shape) != shape or tables.dtype != torch.float32:
        raise ValueError(f"tables must be {shape} fp32, got {tuple(tables.shape)}")
    if tables.device != sketch.device or not tables.is_contiguous():
        raise ValueError(f"tables must be contiguous on {sketch.device}")
    if not len(block) or not block.shape[1]:
        return tables
    x = block.to(device=sketch.device, dtype=torch.float32).contiguous()
    if sketch_triton.supported(x):
        return sketch_triton.sketch_into(sketch, x, tables, offset=offset)
    if x.device.type == "cpu" and sketch_compiled.available():
        tn = tables.numpy()
        sketch_compiled.sketch_block(x.numpy(), offset, tn, sketch.offsets_cpu, sketch.chunk_signs)
        return tables
    if x.device.type == "cpu":
        xn, tn = x.numpy(), tables.numpy()
        add, sub = np.add, np.subtract
    else:
        xn, tn = x, tables
        add, sub = torch.add, torch.sub
    c, position, end = sketch.columns, offset, offset + block.shape[1]
    while position < end:
        k = position // c
        first, last = position - k * c, min(c, end - k * c)  # positions inside chunk k
        segment = xn[:, position - offset : position - offset + last - first]
        for j in range(sketch.rows):
            row, start = tn[:, j], (sketch.offsets_list[j][k] + first) % c
            op = add if sketch.signs_list[j][k] > 0 else sub
            head = min(last - first, c - start)
            target = row[:, start : start + head]
            op(target, segment[:, :head], out=target)
            if head < last - first:
                wrapped = row[:, : last - first - head]
                op(wrapped, segment[:, head:], out=wrapped)
        position = k * c + last
    return tables


def sketch_placed(sketch: CountSketch, flat: Tensor, placement: Placement, table: Tensor) -> Tensor:
    """Add to ``table`` (``[rows, columns]`` fp32, contiguous, on the sketch's device) the sketch
    of the canonical vector that ``placement`` reads from ``flat`` (a bucket buffer); returns
    ``table``. The same table bit for bit as ``sketch.sketch(placement.gather(flat), out=table)``
    (every cell receives its terms in chunk order, segment after segment), without the
    ``d``-element copy on the compiled CPU kernels and on CUDA; the numpy kernels gather.

    >>> sketch = CountSketch(dim=5, rows=2, columns=3, seed=0)
    >>> placement, flat = Placement(((3, 2), (0, 3)), 5), torch.randn(5)
    >>> placed = sketch_placed(sketch, flat, placement, sketch.zeros())
    >>> torch.equal(placed, sketch.sketch(placement.gather(flat)))
    True
    """
    if placement.numel != sketch.dim:
        raise ValueError(f"placement holds {placement.numel} elements, not {sketch.dim}")
    if placement.is_identity:
        return sketch.sketch(flat[: sketch.dim], out=table)
    compiled = flat.device.type == "cpu" and sketch_compiled.available()
    if compiled and flat.dtype == torch.float32 and flat.is_contiguous() and table.is_contiguous():
        sketch_compiled.sketch_segments(
            flat.numpy(),
            placement.starts,
            placement.offsets,
            placement.lengths,
            table.numpy(),
            sketch.offsets_cpu,
            sketch.chunk_signs,
        )
        return table
    if compiled or sketch_triton.supported(flat):
        for start, offset, length in placement.segments():
            sketch_block_into(sketch, flat[None, offset : offset + length], start, table[None])
        return table
    return sketch.sketch(placement.gather(flat), out=table)
