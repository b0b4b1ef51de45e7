"""Count Sketch against an independent reference built from explicit bucket/sign indices."""

from __future__ import annotations

import math

import pytest
import torch

from sketchcomm.sketch import CountSketch, prime_at_most


def reference_table(cs: CountSketch, x: torch.Tensor) -> torch.Tensor:
    buckets, signs = cs.buckets_and_signs(torch.arange(cs.dim))
    table = torch.zeros(cs.rows, cs.columns, dtype=torch.float64)
    return table.scatter_add_(1, buckets, signs.double() * x.double()[None, :])


@pytest.mark.parametrize(("dim", "rows", "columns"), [(1000, 3, 97), (1003, 5, 101), (50, 1, 64)])
def test_sketch_matches_index_reference(dim: int, rows: int, columns: int) -> None:
    cs = CountSketch(dim, rows, columns, seed=7)
    x = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cs.sketch(x).double(), reference_table(cs, x), atol=1e-5, rtol=0)
    ref = reference_table(cs, x).float()
    buckets, signs = cs.buckets_and_signs(torch.arange(dim))
    per_row = ref.gather(1, buckets) * signs
    expected = per_row.median(0).values if rows % 2 else per_row.mean(0)
    torch.testing.assert_close(cs.estimate(ref), expected)
    torch.testing.assert_close(cs.estimate_at(ref, torch.arange(dim)), expected)


def test_linearity_and_accumulation() -> None:
    cs = CountSketch(5000, 3, prime_at_most(400), seed=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    torch.testing.assert_close(cs.sketch(x) + cs.sketch(y), cs.sketch(x + y), atol=1e-5, rtol=0)
    table = cs.sketch(x)
    cs.sketch(y, out=table)
    torch.testing.assert_close(table, cs.sketch(x + y), atol=1e-5, rtol=0)
    idx = torch.tensor([3, 1200, 4999])
    sparse = torch.zeros(5000)
    sparse[idx] = torch.tensor([1.0, -2.0, 3.0])
    torch.testing.assert_close(cs.sketch_sparse(idx, sparse[idx]), cs.sketch(sparse))


def test_same_seed_same_hashes_other_seed_differs() -> None:
    a, b, c = (CountSketch(10_000, 3, 997, seed=s) for s in (5, 5, 6))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    x = torch.randn(10_000)
    assert torch.equal(a.sketch(x), b.sketch(x))
    assert not torch.equal(a.sketch(x), c.sketch(x))


def test_table_as_large_as_vector_is_exact() -> None:
    cs = CountSketch(300, 1, 307, seed=2)
    x = torch.randn(300)
    assert torch.equal(cs.estimate(cs.sketch(x)), x)


def test_half_precision_inputs_accumulate_in_fp32() -> None:
    cs = CountSketch(4000, 3, 499, seed=0)
    x = torch.randn(4000)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        table = cs.sketch(low)
        assert table.dtype == torch.float32
        torch.testing.assert_close(table, cs.sketch(low.float()))


def test_single_row_estimate_is_unbiased_over_seeds() -> None:
    """Each coordinate's single-row estimate has mean x_i and variance ||x_{-i}||^2 / (c - 1).

    Over S independent seeds, the mean error of each coordinate is within 5 standard errors
    (5 * sigma / sqrt(S)); with 200 coordinates a false alarm has probability below 1e-4.
    """
    dim, columns, seeds = 200, 23, 2000
    x = torch.randn(dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    total = torch.zeros(dim, dtype=torch.float64)
    for seed in range(seeds):
        cs = CountSketch(dim, 1, columns, seed=seed)
        total += cs.estimate(cs.sketch(x)).double()
    mean_error = total / seeds - x.double()
    sigma = torch.sqrt((x.double().pow(2).sum() - x.double().pow(2)) / (columns - 1))
    z = mean_error.abs() / (sigma / math.sqrt(seeds))
    assert z.max() < 5.0, z.max()
    # The test has power: a biased estimator (e.g. scaled by 0.9) fails it.
    biased = (0.9 * total / seeds - x.double()).abs() / (sigma / math.sqrt(seeds))
    assert biased.max() > 5.0


def test_heavy_hitters_recovered_with_error_bound() -> None:
    """Planted heavy hitters in Gaussian noise: top-k with five rows finds them, and the estimate
    of each one found is within 3 row standard deviations (||x|| / sqrt(c)) of the truth."""
    dim, k = 200_000, 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dim, generator=g) * 0.01
    heavy = torch.randperm(dim, generator=g)[:k]
    x[heavy] = (torch.rand(k, generator=g) + 1.0) * torch.sign(torch.randn(k, generator=g))
    cs = CountSketch(dim, 5, prime_at_most(dim // 50), seed=4)
    indices, values = cs.heavy_hitters(cs.sketch(x), k)
    recall = len(set(indices.tolist()) & set(heavy.tolist())) / k
    assert recall >= 0.95, recall
    found = torch.isin(indices, heavy)
    noise_sd = x.norm() / math.sqrt(cs.columns)
    assert (values[found] - x[indices[found]]).abs().max() < 3 * noise_sd


def test_l2_estimate() -> None:
    x = torch.randn(100_000)
    cs = CountSketch(100_000, 5, 1009, seed=0)
    assert abs(cs.l2_estimate(cs.sketch(x)).item() / x.norm().item() - 1) < 0.1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dim": 0, "rows": 1, "columns": 10}, "dim"),
        ({"dim": 10, "rows": 0, "columns": 10}, "rows"),
        ({"dim": 10, "rows": 1, "columns": -1}, "columns"),
        ({"dim": 10, "rows": 1.5, "columns": 10}, "rows"),
        ({"dim": 10_000, "rows": 1, "columns": 10}, "columns"),
        ({"dim": 10, "rows": 1, "columns": 10, "seed": "x"}, "seed"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CountSketch(**kwargs)


def test_bad_vectors_are_refused() -> None:
    cs = CountSketch(100, 1, 101)
    with pytest.raises(ValueError, match="100 elements"):
        cs.sketch(torch.zeros(99))
    with pytest.raises(TypeError, match="floating point"):
        cs.sketch(torch.zeros(100, dtype=torch.int64))
