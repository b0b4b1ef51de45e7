"""Triton kernels for the Count Sketch of [`sketchcomm.sketch`][sketchcomm.sketch] on CUDA devices.

They compute what [`CountSketch`][sketchcomm.sketch.CountSketch] computes, with the same hashes:
coordinate ``i = k c + l`` (chunk ``k``, position ``l``) of row ``j`` goes to column
``(o_jk + l) mod c`` with sign ``sigma_j[k]``, where ``o_jk`` and ``sigma_j`` are the sketch's
``offsets`` and ``signs``. Every function takes the sketch, is one or two kernel launches whatever
the number of rows and chunks, and never waits for the device except where said.

* [`sketch_into()`][sketchcomm.sketch_triton.sketch_into] adds the sketches of the rows of
  ``x`` (``[b, d]``, or a block of coordinates at an offset) to ``tables`` (``[b, r, c]``). By
  default each program owns a block of columns of one row and table and adds, for
  ``k = 0, 1, ..., n - 1``, the chunk's term ``sigma_j[k] x[k c + (m - o_jk) mod c]`` to the
  cell's previous value: the additions of the CPU path in the same order, so the tables are
  equal to the CPU's bit for bit. With ``deterministic=False`` programs own blocks of
  coordinates and ``tl.atomic_add`` their ``r`` terms into the tables (``x`` is read once
  instead of ``r`` times); the order of the additions into a cell is then arbitrary, and since a
  cell sums its previous value ``p`` and at most ``n`` terms ``t``, it differs from the CPU's by
  at most ``2 gamma_n (|p| + sum |t|) ~ n eps (|p| + sum |t|)`` (``eps = 2^-23``,
  ``u = eps / 2``, ``gamma_n = n u / (1 - n u)``).
* [`estimate_into()`][sketchcomm.sketch_triton.estimate_into] writes the median over rows of
  ``sigma_j[k] S[j, (o_jk + l) mod c]``: ``min``/``max`` networks in registers for ``r`` in
  {1, 2, 3, 5}, otherwise the value whose rank among the ``r`` (ties broken by row) is the
  middle one (the mean of the middle two for even ``r``). The median selects among the same
  fp32 numbers as the CPU's, so the estimate equals
  [`CountSketch.estimate()`][sketchcomm.sketch.CountSketch.estimate] for a finite table.
* [`heavy_hitters()`][sketchcomm.sketch_triton.heavy_hitters] reads a threshold from a strided
  sample of estimates (on the device), writes every coordinate whose ``|estimate|`` reaches it
  and its estimate with an atomic counter, and runs ``torch.topk`` among those. Reading the
  counter (to know that the candidates hold the top ``k``) is the one host synchronization.

[`supported()`][sketchcomm.sketch_triton.supported] says whether a tensor can use them. With
``TRITON_INTERPRET=1`` set before ``triton`` is imported, the kernels run on CPU tensors (slowly),
which is how they are tested without a GPU.

>>> import torch
>>> supported(torch.zeros(3))  # a CPU tensor: the CPU path of CountSketch applies
False
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

try:
    import triton

    from sketchcomm.sketch_triton_kernels import (
        compact_kernel,
        estimate_kernel,
        sketch_atomic_kernel,
        sketch_rows_kernel,
    )
except ImportError:  # the CPU paths need no Triton
    triton = None

if TYPE_CHECKING:
    from sketchcomm.sketch import CountSketch

__all__ = [
    "THRESHOLD_SAMPLE",
    "estimate_into",
    "estimates_at_least",
    "heavy_hitters",
    "sketch_into",
    "supported",
    "triton_available",
]

# Estimates sampled (with a stride of ``d // THRESHOLD_SAMPLE``) to set the heavy-hitter threshold.
THRESHOLD_SAMPLE = 1 << 16
# Columns of one table row per program of the deterministic sketch, coordinates per program of the
# other kernels. Every launch passes enable_fp_fusion=False: each product and sum is rounded on its
# own, as on the CPU.
_SKETCH_BLOCK = 256
_ESTIMATE_BLOCK = 1024
_COMPACT_BLOCK = 2048
# Chunks whose terms the deterministic sketch loads before adding them (in order), so that that
# many loads are in flight per program.
_SKETCH_UNROLL = 8
# Rows with a min/max network; others hold a [block, r padded to a power of two] tile, so their
# blocks are 4x smaller.
_NETWORK_ROWS = (1, 2, 3, 5)

# Per sketch and device: the offsets o_jk (int32) and signs sigma_j[k] (fp32), both [r, n].
_HASHES: weakref.WeakKeyDictionary[CountSketch, dict[torch.device, tuple[Tensor, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def triton_available() -> bool:
    """Whether ``triton`` imports (``pip install sketchcomm[cuda]``)."""
    return triton is not None


def supported(tensor: Tensor) -> bool:
    """Whether the Triton kernels apply to ``tensor``: a CUDA tensor, with Triton installed."""
    return tensor.is_cuda and triton_available()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "the CUDA kernels need Triton: pip install 'sketchcomm[cuda]' (or triton>=3.0)"
        )


def _hashes(sketch: CountSketch, device: torch.device) -> tuple[Tensor, Tensor]:
    """The sketch's offsets (int32) and signs (fp32) on ``device``, made once per device."""
    per_device = _HASHES.setdefault(sketch, {})
    if device not in per_device:
        offsets = torch.tensor(sketch.offsets_list, dtype=torch.int32)
        signs = torch.tensor(sketch.signs_list, dtype=torch.float32)
        per_device[device] = (offsets.to(device), signs.to(device))
    return per_device[device]


def _check_fp32(name: str, tensor: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if (
        tuple(tensor.shape) != shape
        or tensor.dtype != torch.float32
        or tensor.device != device
        or not tensor.is_contiguous()
    ):
        raise ValueError(
            f"{name} must be a contiguous {shape} fp32 tensor on {device}, got "
            f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
        )


def _block(sketch: CountSketch, block: int) -> int:
    return block if sketch.rows in _NETWORK_ROWS else block // 4


def _rows_padded(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def sketch_into(
    sketch: CountSketch,
    x: Tensor,
    tables: Tensor,
    *,
    offset: int = 0,
    deterministic: bool = True,
) -> Tensor:
    """Add to ``tables`` (``[b, r, c]`` fp32, contiguous, on ``x``'s device) the sketches of the
    vectors that equal the rows of ``x`` (``[b, n]`` fp32, contiguous) at coordinates
    ``offset .. offset + n - 1`` and are zero elsewhere, in one launch; returns ``tables``. With
    ``offset = 0`` and ``n = d`` these are the sketches of the rows of ``x``.

    ``deterministic=True`` gives the tables of ``CountSketch.sketch`` (and, for a block, of
    ``sketchcomm.sketch_blocks.sketch_block_into``) bit for bit, reading ``x`` once per row;
    ``deterministic=False`` reads ``x`` once and adds with atomics, within
    ``2 gamma_n sum |terms|`` of them (see the module docstring).
    """
    _require_triton()
    if x.dim() != 2 or not 0 <= offset <= sketch.dim - x.shape[1]:
        raise ValueError(
            f"x must be a [batch, n] block with 0 <= offset and offset + n <= {sketch.dim}, got "
            f"{tuple(x.shape)} at offset {offset}"
        )
    batch, width = x.shape
    _check_fp32("x", x, (batch, width), x.device)
    _check_fp32("tables", tables, (batch, sketch.rows, sketch.columns), x.device)
    if batch == 0 or width == 0:
        return tables
    offsets, signs = _hashes(sketch, x.device)
    if deterministic:
        blocks = triton.cdiv(sketch.columns, _SKETCH_BLOCK)
        sketch_rows_kernel[(blocks * sketch.rows * batch,)](
            x,
            tables,
            offsets,
            signs,
            offset,
            offset + width,
            sketch.rows,
            sketch.columns,
            sketch.chunks,
            blocks,
            BLOCK=_SKETCH_BLOCK,
            UNROLL=_SKETCH_UNROLL,
            enable_fp_fusion=False,
        )
    else:
        blocks = triton.cdiv(width, _ESTIMATE_BLOCK)
        sketch_atomic_kernel[(blocks * batch,)](
            x,
            tables,
            offsets,
            signs,
            offset,
            offset + width,
            sketch.columns,
            sketch.chunks,
            blocks,
            ROWS=sketch.rows,
            BLOCK=_ESTIMATE_BLOCK,
            enable_fp_fusion=False,
        )
    return tables


def _check_table(sketch: CountSketch, table: Tensor) -> None:
    _check_fp32("table", table, (sketch.rows, sketch.columns), table.device)


def _launch_estimate(
    sketch: CountSketch, table: Tensor, out: Tensor, count: int, stride: int
) -> None:
    offsets, signs = _hashes(sketch, table.device)
    block = _block(sketch, _ESTIMATE_BLOCK)
    estimate_kernel[(triton.cdiv(count, block),)](
        table,
        offsets,
        signs,
        out,
        count,
        stride,
        sketch.columns,
        sketch.chunks,
        ROWS=sketch.rows,
        ROWS_P2=_rows_padded(sketch.rows),
        BLOCK=block,
        enable_fp_fusion=False,
    )


def estimate_into(sketch: CountSketch, table: Tensor, out: Tensor) -> Tensor:
    """Write the median-over-rows estimate of every coordinate of ``table`` (``[r, c]`` fp32,
    contiguous) into ``out`` (``[d]`` fp32, contiguous, same device) in one launch; returns
    ``out``. Equal to [`CountSketch.estimate()`][sketchcomm.sketch.CountSketch.estimate]."""
    _require_triton()
    _check_table(sketch, table)
    _check_fp32("out", out, (sketch.dim,), table.device)
    _launch_estimate(sketch, table, out, sketch.dim, 1)
    return out


def _threshold(
    sketch: CountSketch, table: Tensor, k: int, sample_size: int
) -> tuple[Tensor, int] | None:
    """A magnitude (0-dim device tensor) that about ``1.5 k + 4 sqrt(k) + 8`` estimates (scaled
    from a strided sample) reach, and room for twice as many; ``None`` where the sample is too
    small to be worth it. The rule of the CPU path of ``CountSketch.heavy_hitters``."""
    stride = sketch.dim // sample_size
    if stride < 4:
        return None
    count = -(-sketch.dim // stride)
    expected = k / sketch.dim * count
    rank = math.ceil(1.5 * expected + 4 * math.sqrt(expected) + 8)
    if rank >= count // 4:
        return None
    samples = torch.empty(count, dtype=torch.float32, device=table.device)
    _launch_estimate(sketch, table, samples, count, stride)
    level = torch.kthvalue(samples.abs_(), count - rank + 1).values
    return level, 2 * math.ceil(rank * sketch.dim / count) + _COMPACT_BLOCK


def estimates_at_least(
    sketch: CountSketch, table: Tensor, level: Tensor, capacity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Every coordinate whose ``|estimate|`` reaches ``level`` (a 0-dim or 1-element fp32 tensor
    on the table's device; NaN estimates and a NaN level count as reaching it), in one launch and
    without host synchronization: ``(indices [capacity] int64, values [capacity] fp32, count [1]
    int32)``. The first ``min(count, capacity)`` slots hold the coordinates (in no particular
    order) and their estimates; ``count > capacity`` means some did not fit."""
    _require_triton()
    _check_table(sketch, table)
    if level.numel() != 1 or level.dtype != torch.float32 or level.device != table.device:
        raise ValueError(f"level must be a one-element fp32 tensor on {table.device}")
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    counter = torch.zeros(1, dtype=torch.int32, device=table.device)
    indices = torch.empty(capacity, dtype=torch.int64, device=table.device)
    values = torch.empty(capacity, dtype=torch.float32, device=table.device)
    offsets, signs = _hashes(sketch, table.device)
    block = _block(sketch, _COMPACT_BLOCK)
    compact_kernel[(triton.cdiv(sketch.dim, block),)](
        table,
        offsets,
        signs,
        level,
        counter,
        indices,
        values,
        sketch.dim,
        capacity,
        sketch.columns,
        sketch.chunks,
        ROWS=sketch.rows,
        ROWS_P2=_rows_padded(sketch.rows),
        BLOCK=block,
        enable_fp_fusion=False,
    )
    return indices, values, counter


def heavy_hitters(
    sketch: CountSketch, table: Tensor, k: int, *, sample_size: int = THRESHOLD_SAMPLE
) -> tuple[Tensor, Tensor]:
    """The ``k`` coordinates with the largest ``|estimate|`` of ``table`` (``[r, c]`` fp32):
    ``([k] int64, [k] fp32)`` in no particular order, the same set as
    ``estimate(table).abs().topk(k)`` up to ties at the ``k``-th magnitude, with the same values.

    A threshold ``t`` is read on the device from ``sample_size`` strided estimates; one launch
    appends every coordinate with ``|estimate| >= t`` (NaNs included) and counts them. If there
    are at least ``k`` and all fitted, they hold the top ``k`` and ``torch.topk`` selects among
    them; otherwise (rarely) the whole estimate is selected from. Reading the count is the one
    host synchronization; with fewer than ``4 sample_size`` coordinates there is none (the whole
    estimate is made and selected from).
    """
    _require_triton()
    if not 1 <= k <= sketch.dim:
        raise ValueError(f"k must be in [1, {sketch.dim}], got {k}")
    _check_table(sketch, table)
    threshold = _threshold(sketch, table, k, sample_size)
    if threshold is not None:
        level, capacity = threshold
        indices, values, counter = estimates_at_least(sketch, table, level, capacity)
        found = int(counter.item())  # the host synchronization
        if k <= found <= capacity:
            keep = values[:found].abs().topk(k, sorted=False).indices
            return indices[keep], values[keep]
    estimate = estimate_into(
        sketch, table, torch.empty(sketch.dim, dtype=torch.float32, device=table.device)
    )
    keep = estimate.abs().topk(k, sorted=False).indices
    return keep, estimate[keep]
