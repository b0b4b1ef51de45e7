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
chunk staying in cache while it is added to every row). Estimating coordinate ``i = k * c + l``
from row ``j`` reads ``s_j(i) * S[j, (o_jk + l) mod c]`` with ``o_jk = (b_j + a_j k) mod c``: in the
signed, doubled row ``[S_j, S_j, -S_j, -S_j]`` (length ``4c``) the estimates of chunk ``k`` are the
contiguous window of ``c`` elements starting at ``o_jk`` (``o_jk + 2c`` when ``sigma_j[k] < 0``).

On other devices than the CPU the windows are gathered into ``r`` vectors of ``d`` elements and the
median over rows is taken with elementwise ``min``/``max`` (pure torch). On the CPU the median is
computed block by block (at most :data:`CPU_BLOCK` coordinates at a time) straight from the
windows into the output with the numpy kernels of :mod:`sketchcomm.sketch_numpy`, so no
``d``-element temporary is made; both give the same values, because the median only selects
among the same fp32 numbers. Heavy-hitter selection on the CPU never materializes the estimate: a
threshold is read from a strided sample of estimates, one blocked pass keeps the coordinates above
it, and an exact selection among those gives the same set as ``torch.topk`` (up to ties at the
``k``-th magnitude). Sketching on the CPU adds the same terms in the same order as on other
devices, so tables agree bit for bit too.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from sketchcomm.sketch_numpy import median_rows_into, sliding_windows, top_magnitudes

__all__ = ["CPU_BLOCK", "CountSketch", "derive_seed", "prime_at_most"]

# Elements of one chunk whose median is computed per numpy call on the CPU: the row windows and
# scratch of a block (``(r + 3) * 4 * CPU_BLOCK`` bytes) stay in the L2 cache.
CPU_BLOCK = 1 << 15
# Strided sample of estimates from which heavy-hitter selection on the CPU sets its threshold.
_THRESHOLD_SAMPLE = 1 << 16
# Fewest whole chunks per block for which :meth:`CountSketch.sketch` gathers them: a gathered group
# costs about three passes over it against one for slicing, and saves two numpy calls per chunk
# and row. Estimation gathers from two chunks per block on (it saves a whole median per chunk).
_MIN_SKETCH_GROUP = 8
# Largest signed, doubled table (``16 r c`` bytes) that estimation builds: below glibc's largest
# mmap threshold (32 MiB), so its memory is reused from call to call instead of faulted in anew.
_MAX_DOUBLED_TABLE_BYTES = 16 << 20


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
        gather_starts = offsets + (signs < 0).long() * 2 * columns
        self._gather_starts = gather_starts.to(self.device)
        self._gather_starts_numpy = gather_starts.numpy()
        # Where, in a chunk repeated twice, row j's rotation of chunk k starts.
        self._rotation_starts = ((columns - offsets) % columns).numpy()
        self._chunk_signs = signs.numpy().astype(np.float32)
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
        if len(x):  # an empty batch (e.g. under Poisson sampling) has no tables to fill
            self._accumulate(x, tables)
        return tables

    def _accumulate(self, x: Tensor, tables: Tensor) -> None:
        """Add the sketches of the rows of ``x`` (``[b, d]`` fp32) to ``tables`` (``[b, r, c]``).

        Every table cell receives its terms one chunk after the other, in chunk order, on every
        device and path, so the result is the same bit for bit.
        """
        c = self.columns
        if x.device.type == "cpu":
            # numpy slices cost a fraction of torch's per-op overhead; both views share memory.
            xn, tn = x.numpy(), tables.numpy()
            add, sub = np.add, np.subtract
            first_sliced = self._accumulate_grouped(xn, tn)
        else:
            xn, tn = x, tables
            add, sub = torch.add, torch.sub
            first_sliced = 0
        for k in range(first_sliced, self.chunks):
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

    def _accumulate_grouped(self, x: np.ndarray, tables: np.ndarray) -> int:
        """With ``c <= CPU_BLOCK / 8``, add the whole chunks of ``x`` (``[b, d]``) to ``tables``
        (``[b, r, c]``) ``CPU_BLOCK // c`` chunks at a time: gather each chunk's rotation for a
        row, ``R[k, m] = sigma_j[k] x[k c + (m - o_jk) mod c]``, and add ``S_j + R[0] + R[1] + ...``
        left to right (numpy reduces a non-contiguous axis in order). Returns the first chunk
        left for the sliced path: all of them when ``c`` is large, else the last partial one."""
        c = self.columns
        group = CPU_BLOCK // c
        if group < _MIN_SKETCH_GROUP:
            return 0
        batch, whole = len(x), self.dim // c
        for first in range(0, whole, group):
            count = min(group, whole - first)
            chunks = x[:, first * c : (first + count) * c].reshape(batch, count, c)
            doubled = np.concatenate((chunks, chunks), axis=2).reshape(batch, -1)
            windows = sliding_windows(doubled, c)
            base = np.arange(count) * (2 * c)
            for j in range(self.rows):
                starts = base + self._rotation_starts[j, first : first + count]
                rotated = windows[:, starts]
                rotated *= self._chunk_signs[j, first : first + count, None]
                rotated[:, 0] += tables[:, j]
                np.add.reduce(rotated, axis=1, out=tables[:, j])
        return whole

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

    def _check_table(self, table: Tensor, name: str = "table") -> None:
        if table.shape != self.table_shape or table.dtype != torch.float32:
            raise ValueError(
                f"{name} must be a {self.table_shape} fp32 table, got {tuple(table.shape)} "
                f"{table.dtype}"
            )

    def _cpu_blocks(self, table: Tensor) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Consecutive blocks of coordinates of a CPU table: ``(start, windows)`` where
        ``windows[j]`` holds row ``j``'s estimates ``s_j(i) S[j, h_j(i)]`` of the coordinates
        ``i = start, start + 1, ...``, at most ``len(self._cpu_scratch()[0])`` of them.

        Up to :data:`_MAX_DOUBLED_TABLE_BYTES`, the windows are views of the signed, doubled
        table ``[S_j, S_j, -S_j, -S_j]``: a block lies in one chunk, or with ``c <= CPU_BLOCK / 2``
        holds ``CPU_BLOCK // c`` whole chunks whose windows are gathered (so that the number of
        numpy calls does not grow with the number of chunks). A larger doubled table would cost
        a fresh allocation per call, so instead blocks also end where a row's window wraps
        around, and the windows are views of ``S_j`` or of ``-S_j`` (``r c`` elements copied).
        """
        c = self.columns
        if self.rows * 4 * c * 4 > _MAX_DOUBLED_TABLE_BYTES:
            yield from self._cpu_blocks_split(table.contiguous().numpy())
            return
        signed = np.empty((self.rows, 4 * c), dtype=np.float32)
        signed[:, :c] = table.numpy()
        signed[:, c : 2 * c] = signed[:, :c]
        np.negative(signed[:, :c], out=signed[:, 2 * c : 3 * c])
        signed[:, 3 * c :] = signed[:, 2 * c : 3 * c]
        group = CPU_BLOCK // c
        whole_chunks_gathered = self.dim // c if group >= 2 else 0
        if whole_chunks_gathered:
            windows = [sliding_windows(row, c) for row in signed]
            for first in range(0, whole_chunks_gathered, group):
                last = min(first + group, whole_chunks_gathered)
                starts = self._gather_starts_numpy[:, first:last]
                yield first * c, [w[g].reshape(-1) for w, g in zip(windows, starts, strict=True)]
        for k in range(whole_chunks_gathered, self.chunks):
            starts = self._gather_starts_numpy[:, k].tolist()
            length = min(c, self.dim - k * c)
            for begin in range(0, length, CPU_BLOCK):
                end = min(length, begin + CPU_BLOCK)
                yield k * c + begin, [signed[j, g + begin : g + end] for j, g in enumerate(starts)]

    def _cpu_blocks_split(self, positive: np.ndarray) -> Iterator[tuple[int, list[np.ndarray]]]:
        """:meth:`_cpu_blocks` from ``S`` (``positive``) and ``-S`` alone, with blocks cut where
        a row's window wraps around."""
        c = self.columns
        negative = np.negative(positive)
        for k in range(self.chunks):
            length = min(c, self.dim - k * c)
            offsets = [self._offsets_list[j][k] for j in range(self.rows)]
            sources = [
                positive[j] if self._signs_list[j][k] > 0 else negative[j] for j in range(self.rows)
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

    def _cpu_scratch(self) -> np.ndarray:
        """``[max(3, r), block]`` fp32 scratch for the median of one of :meth:`_cpu_blocks`."""
        c = self.columns
        block = CPU_BLOCK if c >= CPU_BLOCK else c * max(1, CPU_BLOCK // c)
        return np.empty((max(3, self.rows), block), dtype=np.float32)

    def estimate(self, table: Tensor, out: Tensor | None = None) -> Tensor:
        """Median-over-rows estimate of every coordinate, shape ``[dim]`` fp32.

        ``table`` is a ``[rows, columns]`` fp32 table. With ``out`` (a contiguous ``[dim]`` fp32
        tensor on the table's device) the estimate is written into ``out``, which is returned;
        reusing one ``out`` spares allocating (and, for large ``dim``, page-faulting) a new vector
        per call. The CPU computes it block by block with numpy, other devices with torch
        gathers; the values are the same.
        """
        self._check_table(table)
        if out is not None and (
            out.shape != (self.dim,)
            or out.dtype != torch.float32
            or out.device != table.device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous ({self.dim},) fp32 tensor on {table.device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if table.device.type != "cpu":
            estimate = _median_over_rows(self.row_estimates(table))
            return estimate if out is None else out.copy_(estimate)
        result = torch.empty(self.dim, dtype=torch.float32) if out is None else out
        target, scratch = result.numpy(), self._cpu_scratch()
        for start, windows in self._cpu_blocks(table):
            median_rows_into(windows, target[start : start + len(windows[0])], scratch)
        return result

    def estimate_at(self, table: Tensor, indices: Tensor) -> Tensor:
        """Median-over-rows estimate of the coordinates ``indices`` only, shape ``[k]``."""
        buckets, signs = self.buckets_and_signs(indices)
        per_row = table.gather(1, buckets) * signs
        return _median_over_rows(list(per_row.unbind(0)))

    def heavy_hitters(self, table: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` coordinates with the largest estimated magnitude: ``(indices, estimates)``.

        Returns ``([k] int64, [k] fp32)`` in no particular order: the same set as
        ``estimate(table).abs().topk(k)`` up to ties at the ``k``-th magnitude, with the same
        estimates. On the CPU, for a finite table, a threshold ``t`` is taken from a strided sample
        of estimates, at a rank where about ``1.5 k`` coordinates are expected above it; one blocked
        pass keeps the coordinates with ``|estimate| >= t``, and if there are at least ``k`` of
        them they contain every top-``k`` coordinate, which an exact selection then picks. If
        there are fewer, the whole estimate is selected from instead.
        """
        if not 1 <= k <= self.dim:
            raise ValueError(f"k must be in [1, {self.dim}], got {k}")
        self._check_table(table)
        if table.device.type == "cpu" and bool(torch.isfinite(table).all()):
            threshold = self._selection_threshold(table, k)
            if threshold is not None:
                indices, values = self._estimates_at_least(table, threshold)
                if len(indices) >= k:
                    keep = top_magnitudes(values, k)
                    return torch.from_numpy(indices[keep]), torch.from_numpy(values[keep])
            estimates = self.estimate(table)
            indices = torch.from_numpy(top_magnitudes(estimates.numpy(), k))
            return indices, estimates[indices]
        estimates = self.estimate(table)
        indices = estimates.abs().topk(k, sorted=False).indices
        return indices, estimates[indices]

    def _selection_threshold(self, table: Tensor, k: int) -> float | None:
        """A magnitude exceeded by about ``1.5 k + 4 sqrt(k)`` estimates, read from a strided
        sample; ``None`` where the sample is too small to be worth it (the caller then selects
        from the whole estimate)."""
        stride = self.dim // _THRESHOLD_SAMPLE
        if stride < 4:
            return None
        magnitudes = self.estimate_at(table, torch.arange(0, self.dim, stride)).abs().numpy()
        expected = k / self.dim * len(magnitudes)
        rank = math.ceil(1.5 * expected + 4 * math.sqrt(expected) + 8)
        if rank >= len(magnitudes) // 4:
            return None
        position = len(magnitudes) - rank
        return float(np.partition(magnitudes, position)[position])

    def _estimates_at_least(self, table: Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """All coordinates whose ``|estimate| >= threshold`` and their estimates, in one blocked
        pass over a CPU table (no ``[dim]`` vector is made)."""
        scratch = self._cpu_scratch()
        estimate = np.empty(scratch.shape[1], dtype=np.float32)
        magnitude = np.empty_like(estimate)
        mask = np.empty(scratch.shape[1], dtype=bool)
        found_indices, found_values = [], []
        for start, windows in self._cpu_blocks(table):
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

    def l2_estimate(self, table: Tensor) -> Tensor:
        """Estimate of ``||x||_2``: the median over rows of each row's norm.

        Each row's squared norm is an unbiased estimate of ``||x||^2`` because colliding
        coordinates have independent signs.
        """
        return table.norm(dim=1).median()
