"""A compiled CPU kernel (numba) decompressing GEAR blocks in one pass, straight into the output.

For every ``[n, d]`` block it reads each packed code once and writes

    x̂[i, j] = m[i // g_i, j // g_j] + s[i // g_i, j // g_j] · q[i, j] + Σ_k A[i, k] B[j, k]

into a float32 output, which may be a slice of a larger tensor (the keys or values that a
decoding step returns): unpacking, the scale/minimum multiply-add and the low-rank term
``L = A Bᵀ`` are fused, with no temporary the size of the blocks. ``(g_i, g_j)`` is ``(1, g)``
for per-token groups and ``(g, 1)`` for per-channel groups. The codes are laid out as
[`pack_codes()`][sketchcomm.gear.quantization.pack_codes] packs them: for ``b`` in 1, 2, 4, 8 the
``n'`` padded rows are ``8 / b`` planes of ``p = n' b / 8`` rows, row ``i`` in bits
``b (i // p)`` of byte row ``i mod p``; a 3-bit code is a 2-bit plane followed by a 1-bit plane.
The result equals the torch path of
[`CompressedTensor.decompress()`][sketchcomm.gear.compression.CompressedTensor.decompress] up to
float32 rounding (the products are summed in a different order); the outliers are written by the
caller afterwards.

The kernel is compiled on first use and cached on disk, for one signature: a flat float32 output
with an offset and strides (rows contiguous), C-contiguous uint8 codes and float32 scales,
minima and factors. It runs when
[`available()`][sketchcomm.gear.decode_compiled.available] is true: numba is importable and the
environment variable ``SKETCHCOMM_KERNELS`` (as for the Count Sketch kernels,
[`sketchcomm.sketch_compiled`][sketchcomm.sketch_compiled]) is not ``numpy``; otherwise the torch
path runs.

>>> import numpy as np
>>> out = np.zeros(8, dtype=np.float32)  # one [4, 2] block
>>> codes = np.array([[[[0x10, 0x32], [0x00, 0x11]]]], dtype=np.uint8)  # 4-bit, rows 0..3
>>> ones = np.ones((1, 1, 4, 1), dtype=np.float32)  # per-token groups of 2: s = 1, m = 1
>>> a, bt = np.zeros((1, 1, 4, 0), dtype=np.float32), np.zeros((1, 1, 0, 2), dtype=np.float32)
>>> dequantize_into(out, 0, (8, 8, 2), codes, ones, ones, 4, 1, 2, a, bt)
>>> out.reshape(4, 2).tolist()
[[1.0, 3.0], [1.0, 2.0], [2.0, 4.0], [1.0, 2.0]]
"""

from __future__ import annotations

import numpy as np

from sketchcomm.compiled import available, jit

__all__ = ["available", "dequantize_into"]


@jit(error_model="numpy")
def _dequantize_into(
    out, offset, strides, codes, scale, minimum, bits, group_rows, group_cols, factor_a, factor_bt
):
    lead, blocks, packed_rows, _ = codes.shape
    n, rank, d = factor_a.shape[2], factor_bt.shape[2], factor_bt.shape[3]
    if bits == 3:  # a 2-bit plane of n' / 4 rows, then a 1-bit plane of n' / 8 rows
        plane_rows, width = packed_rows * 2 // 3, 2
    else:
        plane_rows, width = packed_rows, bits
    high_rows = packed_rows - plane_rows
    mask = np.uint8((1 << width) - 1)
    for m in range(lead):
        for c in range(blocks):
            for i in range(n):
                base = offset + m * strides[0] + c * strides[1] + i * strides[2]
                row = out[base : base + d]
                low = codes[m, c, i % plane_rows]
                shift = np.uint8(width * (i // plane_rows))
                steps = scale[m, c, i // group_rows]
                minima = minimum[m, c, i // group_rows]
                if group_cols == 1:  # per-channel groups: a step and a minimum per column
                    for j in range(d):
                        row[j] = minima[j] + steps[j] * np.float32((low[j] >> shift) & mask)
                else:  # per-token groups: one step and minimum per run of group_cols columns
                    for group in range(-(-d // group_cols)):
                        first = group * group_cols
                        count = min(group_cols, d - first)
                        step, floor = steps[group], minima[group]
                        part, source = row[first : first + count], low[first : first + count]
                        for j in range(count):
                            part[j] = floor + step * np.float32((source[j] >> shift) & mask)
                if bits == 3:  # add the high bit, worth 4 steps
                    high = codes[m, c, plane_rows + i % high_rows]
                    high_shift = np.uint8(i // high_rows)
                    for j in range(d):
                        step = steps[j] if group_cols == 1 else steps[j // group_cols]
                        row[j] += np.float32(4) * step * np.float32((high[j] >> high_shift) & 1)
                for k in range(rank):
                    weight = factor_a[m, c, i, k]
                    column = factor_bt[m, c, k]
                    for j in range(d):
                        row[j] += weight * column[j]


def dequantize_into(
    out: np.ndarray,
    offset: int,
    strides: tuple[int, int, int],
    codes: np.ndarray,
    scale: np.ndarray,
    minimum: np.ndarray,
    bits: int,
    group_rows: int,
    group_cols: int,
    factor_a: np.ndarray,
    factor_bt: np.ndarray,
) -> None:
    """Write ``m + s q + A Bᵀ`` of every block into ``out`` (see the module docstring).

    Block ``c`` of matrix ``l`` goes to ``out[offset + l s_0 + c s_1 + i s_2 + j]``, so that ``out``
    can be the flat storage of a larger tensor of which the blocks are a slice.

    Args:
        out: flat float32 array, C-contiguous.
        offset: position in ``out`` of entry ``[0, 0, 0, 0]``.
        strides: ``(s_0, s_1, s_2)``, the strides (in entries) of the matrices, blocks and rows.
        codes: packed uint8 codes ``[L, c, n' b / 8, d']`` (``n' >= n``, ``d' >= d``: padded).
        scale: float32 steps ``[L, c, n' / g_i, d' / g_j]``.
        minimum: float32 minima, shaped like ``scale``.
        bits: bits per code, 1, 2, 3, 4 or 8.
        group_rows: ``g_i``, rows per group (1 for per-token groups).
        group_cols: ``g_j``, columns per group (1 for per-channel groups).
        factor_a: float32 ``A``, ``[L, c, n, r]`` (``r = 0`` for no low-rank term).
        factor_bt: float32 ``Bᵀ``, ``[L, c, r, d]``.
    """
    _dequantize_into(
        out,
        offset,
        strides,
        codes,
        scale,
        minimum,
        bits,
        group_rows,
        group_cols,
        factor_a,
        factor_bt,
    )
