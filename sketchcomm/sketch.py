"""Count Sketch of a flat vector, with chunk-rolled hashing that needs no index tables.

A Count Sketch (Charikar, Chen and Farach-Colton, 2002) of a vector ``x`` of dimension ``d`` is a
table ``S`` of ``r`` rows and ``c`` columns,

    S[j, m] = sum_{i : h_j(i) = m} s_j(i) * x[i],

with a bucket hash ``h_j : [d] -> [c]`` and a sign hash ``s_j : [d] -> {-1, +1}`` per row. It is
linear (the sum of the sketches of ``x`` and ``y`` is the sketch of ``x + y``), which is what lets
ranks allreduce tables instead of gradients. Coordinate ``i`` is estimated by
``median_j s_j(i) * S[j, h_j(i)]``.

Hashing
-------
Caching int64 bucket indices costs ``8 * r * d`` bytes (gigabytes for a 100M-parameter model) and
``index_add_`` is slow on CPU, so the hashes here are computed from a handful of numbers per row.
The vector is viewed as ``n = ceil(d / c)`` chunks of ``c`` consecutive coordinates; coordinate
``i = k * c + l`` (chunk ``k``, position ``l``) goes to

    h_j(i) = (b_j + a_j * k + l) mod c,          s_j(i) = sigma_j[k],

with ``a_j`` uniform in ``[1, c)``, ``b_j`` uniform in ``[0, c)`` and ``sigma_j`` a vector of ``n``
independent random signs. Inside one chunk the map is a rotation, so two coordinates of one chunk
never collide. Two coordinates in chunks ``k != k'`` collide when ``a_j (k - k') = l' - l (mod c)``;
when ``c`` is prime and ``n <= c`` this has one solution ``a_j``, so they collide with probability
``1 / (c - 1)``, as under a pairwise independent hash family. Colliding coordinates always lie in
different chunks, whose signs are independent, so ``E[s_j(i) s_j(i')] = 0`` for every colliding
pair: each row's estimate is unbiased and has variance ``sum_{i' != i} x[i']^2 / (c - 1)``, the
same as a Count Sketch with a pairwise bucket hash and 4-wise independent signs. The rows are
independent, so the median over rows concentrates as usual.
[`prime_at_most()`][sketchcomm.sketch.prime_at_most] picks such a ``c``. The hashes depend only on
``(seed, dim, rows, columns)``, so every process that builds a
[`CountSketch`][sketchcomm.sketch.CountSketch] with the same arguments has the same hash functions.

Sketching is ``2 n r`` slice additions of a rolled chunk into a row (a single pass over ``x``, the
chunk staying in cache while it is added to every row). Estimating coordinate ``i = k * c + l``
from row ``j`` reads ``s_j(i) * S[j, (o_jk + l) mod c]`` with ``o_jk = (b_j + a_j k) mod c``: in the
signed, doubled row ``[S_j, S_j, -S_j, -S_j]`` (length ``4c``) the estimates of chunk ``k`` are the
contiguous window of ``c`` elements starting at ``o_jk`` (``o_jk + 2c`` when ``sigma_j[k] < 0``).

On CUDA the Triton kernels of [`sketchcomm.sketch_triton`][sketchcomm.sketch_triton] run
(one launch for all rows); on other devices the windows are gathered and the median taken with
``min``/``max`` (pure torch). On the CPU the compiled kernels of
[`sketchcomm.sketch_compiled`][sketchcomm.sketch_compiled] (without numba, the numpy kernels of
[`sketchcomm.sketch_numpy`][sketchcomm.sketch_numpy]) write the estimate straight into the output.
Every path gives the same values: the median only selects among the same fp32 numbers, and
sketching adds the same terms in the same order. Heavy-hitter selection keeps the coordinates
above a threshold read from a strided sample and selects exactly among those: the same set as
``torch.topk`` (up to ties at the ``k``-th magnitude).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from sketchcomm import sketch_compiled, sketch_triton
from sketchcomm.finite import all_finite
from sketchcomm.hashing import derive_seed, prime_at_most
from sketchcomm.heavy_hitters import select_heavy_hitters
from sketchcomm.placement import Placement
from sketchcomm.sketch_numpy import (
    CPU_BLOCK,
    cpu_blocks,
    cpu_scratch,
    median_over_rows,
    median_rows_into,
    sketch_grouped,
)

__all__ = ["CPU_BLOCK", "CountSketch", "derive_seed", "prime_at_most"]


class CountSketch:
    """Count Sketch of vectors of dimension ``dim`` into a ``rows x columns`` fp32 table.

    Args:
        dim: length ``d`` of the sketched vectors.
        rows: number ``r`` of independent hash rows.
        columns: number ``c`` of columns per row. A prime ``c`` makes the bucket hash pairwise
            independent (see the module docstring);
            [`prime_at_most()`][sketchcomm.sketch.prime_at_most] finds one.
        seed: hash seed. Processes that must agree on the hashes pass the same seed.
        device: device of the hash parameters and of the tables this sketch creates.

    The hash parameters take ``O(r * d / c)`` memory. Tables are always fp32; fp16 and bf16
    inputs are accumulated in fp32.

    >>> sketch = CountSketch(dim=1000, rows=3, columns=101, seed=0)
    >>> x = torch.zeros(1000)
    >>> x[7] = 5.0
    >>> table = sketch.sketch(x)
    >>> table.shape, sketch.heavy_hitters(table, k=1)
    (torch.Size([3, 101]), (tensor([7]), tensor([5.])))
    """

    def __init__(
        self,
        dim: int,
        rows: int,
        columns: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("dim", dim), ("rows", rows), ("columns", columns)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.dim = dim
        self.rows = rows
        self.columns = columns
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunks = -(-dim // columns)
        if self.chunks > columns:
            raise ValueError(
                f"columns must be at least ceil(dim / columns) (about sqrt(dim) = "
                f"{math.isqrt(dim)}) for the hash to stay pairwise independent, got {columns}"
            )
        generator = torch.Generator().manual_seed(
            derive_seed("countsketch", seed, dim, rows, columns)
        )
        if columns > 1:
            slopes = torch.randint(1, columns, (rows,), generator=generator)
        else:
            slopes = torch.zeros(rows, dtype=torch.int64)
        shifts = torch.randint(0, columns, (rows,), generator=generator)
        signs = torch.randint(0, 2, (rows, self.chunks), generator=generator) * 2 - 1
        # offsets[j, k]: where chunk k starts in row j.
        chunk_ids = torch.arange(self.chunks)
        offsets = (shifts[:, None] + slopes[:, None] * chunk_ids[None, :]) % columns
        self.offsets_list: list[list[int]] = offsets.tolist()
        self.signs_list: list[list[int]] = signs.tolist()
        self.offsets = offsets.to(self.device)
        self.signs = signs.to(device=self.device, dtype=torch.float32)
        # Window starts into the signed, doubled table [S_j, S_j, -S_j, -S_j] of length 4c.
        gather_starts = offsets + (signs < 0).long() * 2 * columns
        self.gather_starts = gather_starts.to(self.device)
        self.gather_starts_cpu = gather_starts.numpy()
        # Where, in a chunk repeated twice, row j's rotation of chunk k starts.
        self.rotation_starts = ((columns - offsets) % columns).numpy()
        self.chunk_signs = signs.numpy().astype(np.float32)
        self.offsets_cpu = offsets.numpy()
        self._fingerprint = derive_seed(dim, rows, columns, self.offsets_list, self.signs_list)

    # ------------------------------------------------------------------ hashes
    @property
    def table_shape(self) -> tuple[int, int]:
        return (self.rows, self.columns)

    @property
    def fingerprint(self) -> int:
        """A 63-bit digest of the hash functions; equal on two processes iff their hashes agree."""
        return self._fingerprint

    def buckets_and_signs(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Bucket ``h_j(i)`` and sign ``s_j(i)`` of coordinates ``indices`` (int64, shape ``[k]``).

        Returns ``([r, k] int64, [r, k] fp32)``.
        """
        indices = indices.to(self.device)
        chunk = torch.div(indices, self.columns, rounding_mode="floor")
        position = indices - chunk * self.columns
        buckets = (self.offsets[:, chunk] + position[None, :]) % self.columns
        return buckets, self.signs[:, chunk]

    def zero_cells(self, table: Tensor, indices: Tensor, other: Tensor | None = None) -> None:
        """Set to zero, in place, the cells ``S[j, h_j(i)]`` of ``table`` (``[rows, columns]``
        fp32) of every coordinate ``i`` in ``indices`` (int64), in every row; the same cells of
        ``other`` too (a second table, e.g. the momentum next to the error) in the same pass."""
        tables = [table] if other is None else [table, other]
        for t in tables:
            self._check_table(t)
        cpu = all(t.device.type == "cpu" and t.is_contiguous() for t in tables)
        if cpu and sketch_compiled.available():
            second = None if other is None else other.numpy()
            sketch_compiled.zero_cells(table.numpy(), self.offsets_cpu, indices.numpy(), second)
            return
        cells, _ = self.buckets_and_signs(indices)
        for t in tables:
            t.scatter_(1, cells, 0.0)

    # ------------------------------------------------------------------ sketching
    def zeros(self) -> Tensor:
        """An empty ``[rows, columns]`` fp32 table on the sketch's device."""
        return torch.zeros(self.table_shape, dtype=torch.float32, device=self.device)

    def _check_vector(self, vec: Tensor) -> Tensor:
        if vec.dim() != 1 or vec.numel() != self.dim:
            raise ValueError(
                f"expected a flat vector of {self.dim} elements, got {tuple(vec.shape)}"
            )
        if not vec.is_floating_point():
            raise TypeError(f"Count Sketch needs a floating point vector, got {vec.dtype}")
        return vec.to(device=self.device, dtype=torch.float32).contiguous()

    @property
    def is_exact(self) -> bool:
        """True when the table holds the vector without collisions (one row, ``c >= d``)."""
        return self.rows == 1 and self.columns >= self.dim

    def sketch(self, vec: Tensor, out: Tensor | None = None) -> Tensor:
        """Sketch ``vec`` (shape ``[dim]``, any float dtype) into a ``[rows, columns]`` fp32 table.

        With ``out`` the sketch is added to ``out`` in place and ``out`` is returned.
        """
        x = self._check_vector(vec)
        if out is not None:
            table = out
        elif x.device.type == "cpu":  # numpy's zeros cost a third of torch's for small tables
            table = torch.from_numpy(np.zeros(self.table_shape, dtype=np.float32))
        else:
            table = self.zeros()
        if table.shape != self.table_shape or table.dtype != torch.float32:
            raise ValueError(
                f"out must be a {self.table_shape} fp32 table, got {tuple(table.shape)}"
            )
        if x.device.type == "cpu" and sketch_compiled.available():
            # numpy views: the compiled kernel's call costs less than torch's two views.
            sketch_compiled.sketch_block(
                x.numpy()[None], 0, table.numpy()[None], self.offsets_cpu, self.chunk_signs
            )
        else:
            self._accumulate(x[None, :], table[None])
        return table

    def sketch_batch(self, vectors: Tensor) -> Tensor:
        """Sketch each row of ``vectors`` (``[batch, dim]``) into ``[batch, rows, columns]``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected [batch, {self.dim}] vectors, got {tuple(vectors.shape)}")
        x = vectors.to(device=self.device, dtype=torch.float32).contiguous()
        tables = torch.zeros((len(x), *self.table_shape), dtype=torch.float32, device=self.device)
        if len(x):  # an empty batch (e.g. under Poisson sampling) has no tables to fill
            self._accumulate(x, tables)
        return tables

    def _accumulate(self, x: Tensor, tables: Tensor) -> None:
        """Add the sketches of the rows of ``x`` (``[b, d]`` fp32) to ``tables`` (``[b, r, c]``).

        Every table cell receives its terms one chunk after the other, in chunk order, on every
        device and path, so the result is the same bit for bit.
        """
        if sketch_triton.supported(x):
            sketch_triton.sketch_into(self, x, tables)
            return
        c = self.columns
        if x.device.type == "cpu" and sketch_compiled.available():
            sketch_compiled.sketch_block(
                x.numpy(), 0, tables.numpy(), self.offsets_cpu, self.chunk_signs
            )
            return
        if x.device.type == "cpu":
            # numpy slices cost a fraction of torch's per-op overhead; both views share memory.
            xn, tn = x.numpy(), tables.numpy()
            add, sub = np.add, np.subtract
            first_sliced = sketch_grouped(self, xn, tn)
        else:
            xn, tn = x, tables
            add, sub = torch.add, torch.sub
            first_sliced = 0
        for k in range(first_sliced, self.chunks):
            chunk = xn[:, k * c : (k + 1) * c]
            length = chunk.shape[1]
            for j in range(self.rows):
                row, offset = tn[:, j], self.offsets_list[j][k]
                op = add if self.signs_list[j][k] > 0 else sub
                head = min(length, c - offset)
                target = row[:, offset : offset + head]
                op(target, chunk[:, :head], out=target)
                if head < length:
                    wrapped = row[:, : length - head]
                    op(wrapped, chunk[:, head:], out=wrapped)

    # ------------------------------------------------------------------ recovery
    def row_estimates(self, table: Tensor) -> list[Tensor]:
        """Per-row estimates ``s_j(i) * S[j, h_j(i)]`` of all coordinates (``r`` of ``[dim]``)."""
        c = self.columns
        estimates = []
        for j in range(self.rows):
            row = table[j]
            signed = torch.cat((row, row, -row, -row))
            windows = signed.unfold(0, c, 1).index_select(0, self.gather_starts[j])
            estimates.append(windows.view(-1)[: self.dim])
        return estimates

    def _check_table(self, table: Tensor, name: str = "table") -> None:
        if table.shape != self.table_shape or table.dtype != torch.float32:
            raise ValueError(
                f"{name} must be a {self.table_shape} fp32 table, got {tuple(table.shape)} "
                f"{table.dtype}"
            )

    def _check_out(self, out: Tensor | None, device: torch.device, numel: int = 0) -> None:
        numel = numel or self.dim
        if out is not None and (
            out.shape != (numel,)
            or out.dtype != torch.float32
            or out.device != device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous ({numel},) fp32 tensor on {device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
            )

    def estimate(
        self, table: Tensor, out: Tensor | None = None, placement: Placement | None = None
    ) -> Tensor:
        """Median-over-rows estimate of every coordinate, shape ``[dim]`` fp32.

        ``table`` is a ``[rows, columns]`` fp32 table. With ``out`` (a contiguous ``[dim]`` fp32
        tensor on the table's device) the estimate is written into ``out``, which is returned;
        reusing one ``out`` spares allocating (and, for large ``dim``, page-faulting) a new vector
        per call. With ``placement`` too, coordinate ``i`` is written at
        ``placement.positions(i)`` (``out`` a buffer holding the placement's positions), on the
        CPU in the estimate's own pass. The CPU computes it block by block with numpy, other
        devices with torch gathers; the values are the same.
        """
        self._check_table(table)
        if placement is not None and (placement.numel != self.dim or out is None):
            raise ValueError(f"a placement needs out and {self.dim} elements")
        placed = placement is not None and not placement.is_identity
        self._check_out(out, table.device, max(len(out), placement.extent) if placed else 0)
        if placed and table.device.type != "cpu":
            return placement.scatter(self.estimate(table), out)
        if sketch_triton.supported(table):
            out = table.new_empty(self.dim) if out is None else out
            return sketch_triton.estimate_into(self, table.contiguous(), out)
        if table.device.type != "cpu":
            estimate = median_over_rows(self.row_estimates(table))
            return estimate if out is None else out.copy_(estimate)
        result = torch.empty(self.dim, dtype=torch.float32) if out is None else out
        if sketch_compiled.available():
            cells = table.contiguous().numpy()
            if all_finite(cells):
                pairs = placement.pairs if placed else sketch_compiled.IDENTITY_PLACEMENT
                sketch_compiled.estimate_into(
                    cells, self.offsets_cpu, self.chunk_signs, self.dim, result.numpy(), pairs
                )
                return result
        target, scratch = result.numpy(), cpu_scratch(self)
        block = np.empty(scratch.shape[1], dtype=np.float32) if placed else None
        for start, windows in cpu_blocks(self, table):
            n = len(windows[0])
            if placed:
                median_rows_into(windows, block[:n], scratch)
                placement.place(start, block[:n], target)
            else:
                median_rows_into(windows, target[start : start + n], scratch)
        return result

    def estimate_at(self, table: Tensor, indices: Tensor) -> Tensor:
        """Median-over-rows estimate of the coordinates ``indices`` only, shape ``[k]``."""
        buckets, signs = self.buckets_and_signs(indices)
        per_row = table.gather(1, buckets) * signs
        return median_over_rows(list(per_row.unbind(0)))

    def heavy_hitters(
        self,
        table: Tensor,
        k: int,
        out: Tensor | None = None,
        placement: Placement | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` coordinates with the largest estimated magnitude: ``(indices, estimates)``.

        Returns ``([k] int64, [k] fp32)`` in no particular order: the same set as
        ``estimate(table).abs().topk(k)`` up to ties at the ``k``-th magnitude, with the same
        estimates (see [`sketchcomm.heavy_hitters`][sketchcomm.heavy_hitters]). With ``out``
        (contiguous ``[dim]`` fp32 on the table's device) the top-``k`` vector (zero elsewhere)
        is written into it, on the CPU during the selection's pass; with ``placement`` too,
        coordinate ``i`` is written at ``placement.positions(i)`` (``out`` then a buffer that
        holds the placement's positions; the others are left as they are).
        """
        if not 1 <= k <= self.dim:
            raise ValueError(f"k must be in [1, {self.dim}], got {k}")
        self._check_table(table)
        if placement is not None and placement.numel != self.dim:
            raise ValueError(f"placement holds {placement.numel} elements, not {self.dim}")
        extent = self.dim if placement is None or out is None else max(len(out), placement.extent)
        self._check_out(out, table.device, extent)
        return select_heavy_hitters(self, table, k, out, placement)
