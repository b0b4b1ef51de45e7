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
independent, so the median over rows concentrates as usual. :func:`prime_at_most` picks such a
``c``. The hashes depend only on ``(seed, dim, rows, columns)``, so every process that builds a
:class:`CountSketch` with the same arguments has the same hash functions.

Sketching is ``2 n r`` slice additions of a rolled chunk into a row (a single pass over ``x``, the
chunk staying in cache while it is added to every row); estimating every coordinate is one gather
of ``d`` elements per row from a table small enough to stay in cache, then a median over rows
computed with elementwise ``min``/``max`` for ``r`` in {1, 2, 3, 5}.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["CountSketch", "derive_seed", "prime_at_most"]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % f for f in range(3, math.isqrt(n) + 1, 2))


def prime_at_most(n: int) -> int:
    """The largest prime ``<= n`` (``n >= 2``); primes are dense, so this stays close to ``n``."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    while not _is_prime(n):
        n -= 1
    return n


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a stable function of ``parts`` (same on every process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _median3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _median_over_rows(rows: list[Tensor]) -> Tensor:
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


class CountSketch:
    """Count Sketch of vectors of dimension ``dim`` into a ``rows x columns`` fp32 table.

    Args:
        dim: length ``d`` of the sketched vectors.
        rows: number ``r`` of independent hash rows.
        columns: number ``c`` of columns per row. A prime ``c`` makes the bucket hash pairwise
            independent (see the module docstring); :func:`prime_at_most` finds one.
        seed: hash seed. Processes that must agree on the hashes pass the same seed.
        device: device of the hash parameters and of the tables this sketch creates.

    The hash parameters take ``O(r * d / c)`` memory. Tables are always fp32; fp16 and bf16
    inputs are accumulated in fp32.
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
        self._offsets_list: list[list[int]] = offsets.tolist()
        self._signs_list: list[list[int]] = signs.tolist()
        self.offsets = offsets.to(self.device)
        self.signs = signs.to(device=self.device, dtype=torch.float32)
        # Window starts into the signed, doubled table [S_j, S_j, -S_j, -S_j] of length 4c.
        self._gather_starts = (offsets + (signs < 0).long() * 2 * columns).to(self.device)
        self._fingerprint = derive_seed(dim, rows, columns, self._offsets_list, self._signs_list)

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
        table = self.zeros() if out is None else out
        if table.shape != self.table_shape or table.dtype != torch.float32:
            raise ValueError(
                f"out must be a {self.table_shape} fp32 table, got {tuple(table.shape)}"
            )
        self._accumulate(x[None, :], table[None])
        return table

    def sketch_batch(self, vectors: Tensor) -> Tensor:
        """Sketch each row of ``vectors`` (``[batch, dim]``) into ``[batch, rows, columns]``."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected [batch, {self.dim}] vectors, got {tuple(vectors.shape)}")
        x = vectors.to(device=self.device, dtype=torch.float32).contiguous()
        tables = torch.zeros((len(x), *self.table_shape), dtype=torch.float32, device=self.device)
        self._accumulate(x, tables)
        return tables

    def _accumulate(self, x: Tensor, tables: Tensor) -> None:
        """Add the sketches of the rows of ``x`` (``[b, d]`` fp32) to ``tables`` (``[b, r, c]``)."""
        c = self.columns
        if x.device.type == "cpu":
            # numpy slices cost a fraction of torch's per-op overhead; both views share memory.
            xn, tn = x.numpy(), tables.numpy()
            add, sub = np.add, np.subtract
        else:
            xn, tn = x, tables
            add, sub = torch.add, torch.sub
        for k in range(self.chunks):
            chunk = xn[:, k * c : (k + 1) * c]
            length = chunk.shape[1]
            for j in range(self.rows):
                row, offset = tn[:, j], self._offsets_list[j][k]
                op = add if self._signs_list[j][k] > 0 else sub
                head = min(length, c - offset)
                target = row[:, offset : offset + head]
                op(target, chunk[:, :head], out=target)
                if head < length:
                    wrapped = row[:, : length - head]
                    op(wrapped, chunk[:, head:], out=wrapped)

    def sketch_sparse(self, indices: Tensor, values: Tensor, out: Tensor | None = None) -> Tensor:
        """Sketch the vector that is ``values`` at ``indices`` and zero elsewhere (``O(r k)``)."""
        table = self.zeros() if out is None else out
        buckets, signs = self.buckets_and_signs(indices)
        table.scatter_add_(1, buckets, signs * values.to(self.device, torch.float32)[None, :])
        return table

    # ------------------------------------------------------------------ recovery
    def row_estimates(self, table: Tensor) -> list[Tensor]:
        """Per-row estimates ``s_j(i) * S[j, h_j(i)]`` of all coordinates (``r`` of ``[dim]``)."""
        c = self.columns
        estimates = []
        for j in range(self.rows):
            row = table[j]
            signed = torch.cat((row, row, -row, -row))
            windows = signed.unfold(0, c, 1).index_select(0, self._gather_starts[j])
            estimates.append(windows.view(-1)[: self.dim])
        return estimates

    def estimate(self, table: Tensor) -> Tensor:
        """Median-over-rows estimate of every coordinate, shape ``[dim]`` fp32."""
        return _median_over_rows(self.row_estimates(table))

    def estimate_at(self, table: Tensor, indices: Tensor) -> Tensor:
        """Median-over-rows estimate of the coordinates ``indices`` only, shape ``[k]``."""
        buckets, signs = self.buckets_and_signs(indices)
        per_row = table.gather(1, buckets) * signs
        return _median_over_rows(list(per_row.unbind(0)))

    def heavy_hitters(self, table: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` coordinates with the largest estimated magnitude: ``(indices, estimates)``."""
        if not 1 <= k <= self.dim:
            raise ValueError(f"k must be in [1, {self.dim}], got {k}")
        estimates = self.estimate(table)
        indices = estimates.abs().topk(k, sorted=False).indices
        return indices, estimates[indices]

    def l2_estimate(self, table: Tensor) -> Tensor:
        """Estimate of ``||x||_2``: the median over rows of each row's norm.

        Each row's squared norm is an unbiased estimate of ``||x||^2`` because colliding
        coordinates have independent signs.
        """
        return table.norm(dim=1).median()
