"""Count Sketch against an independent reference built from explicit bucket/sign indices."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.kernels import TARGET_RATIO
from sketchcomm import sketch_compiled
from sketchcomm.cli import main
from sketchcomm.finite import all_finite, tensor_is_finite
from sketchcomm.placement import Placement
from sketchcomm.sketch import CPU_BLOCK, CountSketch, prime_at_most
from sketchcomm.sketch_blocks import sketch_block_into, sketch_placed
from sketchcomm.sketch_numpy import median_over_rows


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


@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize(("dim", "columns"), [(100_003, 997), (100_003, 4999), (200_001, 40_009)])
def test_sketch_adds_chunks_in_order_bit_for_bit(dim: int, rows: int, columns: int) -> None:
    """Every path (whole chunks gathered by the block for 997 columns, sliced one by one for more)
    gives each cell ``((S + t_0) + t_1) + ...`` in chunk order, as rotating and adding each
    zero-padded chunk in turn does, for a table already holding values and for a batch."""
    cs = CountSketch(dim, rows, columns, seed=rows)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, dim, generator=g) * 10.0 ** torch.randint(-3, 4, (2, dim), generator=g)
    start = torch.randn(rows, columns, generator=g)
    expected = start.clone()
    padded = torch.nn.functional.pad(x, (0, cs.chunks * columns - dim)).view(2, -1, columns)
    for k in range(cs.chunks):
        for j in range(rows):
            rotated = torch.roll(padded[0, k], int(cs.offsets[j, k])) * cs.signs[j, k]
            expected[j] += rotated
    table = cs.sketch(x[0], out=start.clone())
    assert torch.equal(table.view(torch.int32), expected.view(torch.int32))
    batch = cs.sketch_batch(x)
    assert torch.equal(batch[1], cs.sketch(x[1])) and torch.equal(batch[0], cs.sketch(x[0]))


def sorted_median_reference(cs: CountSketch, table: torch.Tensor) -> torch.Tensor:
    """Median over rows of explicit per-row estimates, from a full sort (mean of the middle two for
    an even number of rows)."""
    buckets, signs = cs.buckets_and_signs(torch.arange(cs.dim))
    ordered = (table.gather(1, buckets) * signs).sort(dim=0).values
    middle = cs.rows // 2
    if cs.rows % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) * 0.5


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize(("dim", "columns"), [(10_007, 211), (200_001, 40_009)])
def test_cpu_estimate_is_bit_identical_to_the_torch_path(dim: int, rows: int, columns: int) -> None:
    """The blocked numpy estimate on the CPU equals, bit for bit, the gather-and-median torch path
    that other devices run and a full-sort reference; ``dim`` is not a multiple of ``columns``,
    and 40009 columns are more than one block."""
    assert columns > CPU_BLOCK or dim == 10_007
    cs = CountSketch(dim, rows, columns, seed=rows)
    table = cs.sketch(torch.randn(dim, generator=torch.Generator().manual_seed(rows)))
    estimate = cs.estimate(table)
    torch_path = median_over_rows(cs.row_estimates(table))
    assert torch.equal(estimate.view(torch.int32), torch_path.view(torch.int32))
    assert torch.equal(estimate, sorted_median_reference(cs, table))
    out = torch.full((dim,), math.nan)
    assert cs.estimate(table, out=out) is out
    assert torch.equal(out, estimate)


@pytest.mark.parametrize(
    ("rows", "columns"), [(1, 1_100_009), (2, 530_017), (3, 350_003), (5, 210_011)]
)
def test_cpu_estimate_of_a_large_table_is_bit_identical(rows: int, columns: int) -> None:
    """Tables of more than 16 MiB when doubled and signed (``16 r c`` bytes) are read through
    windows cut where they wrap around: still the torch path's values, bit for bit."""
    dim = 1_500_007
    cs = CountSketch(dim, rows, prime_at_most(columns), seed=rows)
    table = cs.sketch(torch.randn(dim, generator=torch.Generator().manual_seed(rows)))
    estimate = cs.estimate(table)
    torch_path = median_over_rows(cs.row_estimates(table))
    assert torch.equal(estimate.view(torch.int32), torch_path.view(torch.int32))
    assert torch.equal(estimate, sorted_median_reference(cs, table))
    k = dim // 100
    assert_top_k(estimate, *cs.heavy_hitters(table, k), k)


def test_estimate_refuses_bad_tables_and_outputs() -> None:
    cs = CountSketch(1000, 3, 101)
    with pytest.raises(ValueError, match="table"):
        cs.estimate(torch.zeros(3, 100))
    with pytest.raises(ValueError, match="table"):
        cs.estimate(torch.zeros(3, 101, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        cs.estimate(cs.zeros(), out=torch.zeros(999))
    with pytest.raises(ValueError, match="out"):
        cs.estimate(cs.zeros(), out=torch.zeros(2000)[::2])


def assert_top_k(
    estimate: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, k: int
) -> None:
    """``indices`` are ``k`` distinct coordinates with the largest ``|estimate|`` (the same set as
    ``torch.topk`` up to ties at the ``k``-th magnitude) and ``values`` their estimates."""
    assert indices.dtype == torch.int64 and len(indices) == k == len(set(indices.tolist()))
    assert torch.equal(values, estimate[indices])
    expected = estimate.abs().topk(k).values
    assert torch.equal(values.abs().sort(descending=True).values, expected)
    outside = torch.ones(len(estimate), dtype=torch.bool)
    outside[indices] = False
    assert k == len(estimate) or estimate[outside].abs().max() <= expected[-1]


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_heavy_hitters_select_the_torch_topk_set(rows: int) -> None:
    """300007 coordinates: the sampled-threshold path (k = 1, d / 100, d / 20) and the selection
    from the whole estimate (k = d / 3, d)."""
    dim = 300_007
    cs = CountSketch(dim, rows, prime_at_most(dim // (20 * rows)), seed=rows)
    x = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    table = cs.sketch(x)
    estimate = cs.estimate(table)
    for k in (1, dim // 100, dim // 20, dim // 3, dim):
        assert_top_k(estimate, *cs.heavy_hitters(table, k), k)


def test_heavy_hitters_when_the_sample_overestimates_the_threshold() -> None:
    """Every fourth coordinate is sampled; 2000 sampled coordinates of 1.0 put the threshold at 1.0,
    which fewer than k coordinates reach, so the selection falls back to the whole estimate."""
    dim, k = 300_000, 3000
    cs = CountSketch(dim, 1, prime_at_most(300_100))
    x = torch.zeros(dim)
    x[torch.arange(0, 8000, 4)] = 1.0
    others = torch.arange(1, 4 * k, 4)
    x[others] = 0.5 + torch.arange(len(others)) * 1e-5
    table = cs.sketch(x)
    indices, values = cs.heavy_hitters(table, k)
    assert_top_k(cs.estimate(table), indices, values, k)
    assert set(range(0, 8000, 4)) <= set(indices.tolist())


def test_heavy_hitters_of_a_non_finite_table_follow_torch_topk() -> None:
    """NaN estimates rank above every number, as in ``torch.topk``."""
    dim = 300_007
    cs = CountSketch(dim, 1, prime_at_most(dim // 20))
    table = cs.sketch(torch.randn(dim))
    table[0, 5] = math.nan
    estimate = cs.estimate(table)
    nan_coordinates = set(torch.nonzero(estimate.isnan()).flatten().tolist())
    indices, _ = cs.heavy_hitters(table, 3 * len(nan_coordinates))
    assert nan_coordinates and nan_coordinates <= set(indices.tolist())


def test_quick_kernel_benchmark_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "kernels.json"
    argv = ["bench", "kernels", "--quick", "--sizes", "1e5", "--rows", "1", "3"]
    argv += ["--paths", "numpy", "compiled"]
    assert main([*argv, "--json", str(path), "--markdown", str(tmp_path / "k.md")]) == 0
    report = json.loads(path.read_text())
    cases = [(c["path"], c["size"], c["rows"]) for c in report["cases"]]
    assert cases == [(p, 100_000, r) for r in (1, 3) for p in ("numpy", "compiled")]
    for case in report["cases"]:
        assert all(math.isfinite(r) and r > 0 for r in case["ratios"].values())
        assert case["within_target"] == (case["ratios"]["sketch+unsketch"] <= TARGET_RATIO)
    table = (tmp_path / "k.md").read_text()
    out = capsys.readouterr().out
    assert table in out and table.count("| cpu | numpy | 1e5 |") == 2
    assert table.count("| cpu | compiled | 1e5 |") == 2


def numpy_kernels_agree(monkeypatch: pytest.MonkeyPatch, compute) -> None:
    """``compute()`` gives the same tensors, bit for bit, with the compiled kernels and with the
    numpy fallback forced by ``SKETCHCOMM_KERNELS=numpy``."""
    pytest.importorskip("numba")
    monkeypatch.delenv(sketch_compiled.ENVIRONMENT_VARIABLE, raising=False)
    assert sketch_compiled.available()
    compiled = compute()
    monkeypatch.setenv(sketch_compiled.ENVIRONMENT_VARIABLE, "numpy")
    assert not sketch_compiled.available()
    fallback = compute()
    for a, b in zip(compiled, fallback, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(
    ("dim", "rows", "columns"),
    [
        (10_007, 1, 211),
        (10_007, 2, 211),
        (10_007, 4, 211),
        (10_007, 7, 211),
        (100_003, 3, 997),
        (100_003, 5, 4999),
        (200_001, 3, 40_009),
        (300_007, 3, 5003),
    ],
)
def test_compiled_kernels_equal_the_numpy_path(
    monkeypatch: pytest.MonkeyPatch, dim: int, rows: int, columns: int
) -> None:
    """Sketch (into a table already holding values, and a batch), blocks sketched at offsets that
    cross chunks, the estimate, the heavy hitters with a sampled threshold and the table with
    their cells zeroed (alone and with a second table), the sketch read through a placement and
    the top-k vector written through it: the compiled kernels and the numpy path give the same
    bits (the sketch's sums in the same order, the median from the same network), and the
    placed results equal the canonical ones moved into place."""
    cs = CountSketch(dim, rows, columns, seed=rows)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(3, dim, generator=g) * 10.0 ** torch.randint(-3, 4, (3, dim), generator=g)
    start = torch.randn(rows, columns, generator=g)
    cut = dim // 3 + 17
    k = dim // 100

    def compute() -> list[torch.Tensor]:
        table = cs.sketch(x[0], out=start.clone())
        blocks = torch.zeros(3, rows, columns)
        sketch_block_into(cs, x[:, :cut], 0, blocks)
        sketch_block_into(cs, x[:, cut:], cut, blocks)
        indices, values = cs.heavy_hitters(table, k)
        order = indices.argsort()
        zeroed = table.clone()
        cs.zero_cells(zeroed, indices)
        pair = table.clone(), table * 2.0
        cs.zero_cells(pair[0], indices, pair[1])
        assert torch.equal(pair[0], zeroed) and torch.equal(pair[1], zeroed * 2.0)
        estimate = cs.estimate(table)
        # The canonical vector x[0][cut:] + x[0][:cut], read from and written over x[0]'s order.
        placement = Placement(((cut, dim - cut), (0, cut)), dim)
        placed = sketch_placed(cs, x[0], placement, start.clone())
        assert torch.equal(placed, cs.sketch(placement.gather(x[0]), out=start.clone()))
        placed_top, canonical_top = torch.full((dim,), 7.0), torch.empty(dim)
        cs.heavy_hitters(table, k, out=placed_top, placement=placement)
        cs.heavy_hitters(table, k, out=canonical_top)
        assert torch.equal(placement.scatter(canonical_top, torch.empty(dim)), placed_top)
        for where in placement, _many_segments(dim):
            placed_estimate = cs.estimate(table, out=torch.full((dim,), 7.0), placement=where)
            assert torch.equal(placed_estimate, where.scatter(estimate, torch.empty(dim)))
        outputs = [table, cs.sketch_batch(x), blocks, estimate, values[order], zeroed]
        return [*outputs, pair[1], placed, placed_top]

    numpy_kernels_agree(monkeypatch, compute)


def _many_segments(dim: int) -> Placement:
    """Seven segments of uneven lengths (some shorter than a chunk, some across several), laid
    out in the buffer in reverse order."""
    cuts = [0, 1, dim // 7, dim // 7 + 3, dim // 2, dim // 2 + 101, dim - 2, dim]
    lengths = [end - begin for begin, end in itertools.pairwise(cuts)]
    offsets = [sum(lengths[i + 1 :]) for i in range(len(lengths))]
    return Placement(tuple(zip(offsets, lengths, strict=True)), dim)


def test_placed_estimate_of_a_nonfinite_table_is_the_canonical_one_in_place() -> None:
    """A table holding an infinity takes the fallback path; the placed estimate still equals the
    canonical estimate moved into place."""
    cs = CountSketch(3000, 3, 101, seed=1)
    table = cs.sketch(torch.randn(3000, generator=torch.Generator().manual_seed(2)))
    table[1, 5] = float("inf")
    placement = _many_segments(3000)
    placed = cs.estimate(table, out=torch.full((3000,), 7.0), placement=placement)
    assert torch.equal(placed, placement.scatter(cs.estimate(table), torch.empty(3000)))
    with pytest.raises(ValueError, match="placement needs out"):
        cs.estimate(table, placement=placement)


def test_compiled_threshold_pass_keeps_every_coordinate_above_it() -> None:
    """With more coordinates at or above the threshold than room for them, the pass is repeated
    with room for all: every coordinate of an exactly sketched vector of ones is found."""
    pytest.importorskip("numba")
    dim = 300_000
    cs = CountSketch(dim, 1, prime_at_most(300_100))
    table = cs.sketch(torch.ones(dim))
    indices, values = sketch_compiled.estimates_above(
        table.numpy(), cs.offsets_cpu, cs.chunk_signs, dim, 1.0, capacity=5
    )
    assert sorted(indices.tolist()) == list(range(dim)) and (values == 1.0).all()
    indices, values = cs.heavy_hitters(table, 10)
    assert len(set(indices.tolist())) == 10 and torch.equal(values, torch.ones(10))


@pytest.mark.parametrize("path", ["compiled", "numpy"])
@pytest.mark.parametrize("dim", [300_007, 20_011])
def test_heavy_hitters_write_the_top_k_vector_into_out(
    monkeypatch: pytest.MonkeyPatch, path: str, dim: int
) -> None:
    """``out`` (holding garbage from an earlier step) ends as the estimates at the selected
    coordinates and zeros elsewhere, with the sampled threshold (300007) and without (20011)."""
    if path == "compiled":
        pytest.importorskip("numba")
    monkeypatch.setenv(sketch_compiled.ENVIRONMENT_VARIABLE, path)
    cs = CountSketch(dim, 3, prime_at_most(max(dim // 60, 500)), seed=4)
    table = cs.sketch(torch.randn(dim, generator=torch.Generator().manual_seed(4)))
    k = dim // 100
    out = torch.full((dim,), 7.0)
    indices, values = cs.heavy_hitters(table, k, out=out)
    assert_top_k(cs.estimate(table), indices, values, k)
    expected = torch.zeros(dim)
    expected[indices] = values
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 9973)])
def test_compiled_finiteness_check_agrees_with_numpy(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    table = (rng.standard_normal(shape) * 1e30).astype(np.float32)
    table.flat[0] = np.finfo(np.float32).max
    table.flat[-1] = -np.finfo(np.float32).tiny / 4  # subnormal
    assert all_finite(table)
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        for position in (0, table.size // 2, table.size - 1):
            spoiled = table.copy()
            spoiled.flat[position] = bad
            assert all_finite(spoiled) == bool(np.isfinite(spoiled).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_finiteness_check_agrees_with_torch(dtype: torch.dtype) -> None:
    table = torch.randn(3, 40).to(dtype)
    views = {"contiguous": lambda t: t, "transposed": lambda t: t.t(), "column": lambda t: t[:, 1]}
    for name, view_of in views.items():
        assert tensor_is_finite(view_of(table)), name
        for bad in (float("inf"), float("nan")):
            for row, column in ((0, 1), (2, 1), (1, 1)):
                spoiled = table.clone()
                spoiled[row, column] = bad
                assert tensor_is_finite(view_of(spoiled)) is False, (name, bad, row)
