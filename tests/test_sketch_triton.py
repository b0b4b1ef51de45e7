"""The Triton kernels against the CPU paths of ``CountSketch``, run by Triton's interpreter.

All cases run in one fresh interpreter with ``TRITON_INTERPRET=1`` (see
``tests/triton_interpreted.py``) on CPU tensors; every reference is computed here with
``CountSketch`` on the CPU. Sizes stay small: the interpreter executes each program with numpy.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch
from triton_interpreted import block_bounds, case_inputs, run_interpreted

from sketchcomm.sketch import CountSketch
from sketchcomm.sketch_blocks import sketch_block_into
from sketchcomm.sketch_numpy import estimates_at_least

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None,
        reason="needs Triton (pip install 'sketchcomm[cuda]' or the dev extra)",
    ),
    # One worker runs the interpreted cases once (a session fixture: xdist may interleave other
    # modules, which would set a module fixture up again; about 20 s).
    pytest.mark.xdist_group("triton-interpreted"),
    pytest.mark.slow,
]

BASE = {"batch": 1, "k": 20, "sample_size": 512, "level_quantile": 0.99, "capacity": 4096}
CASES: dict[str, dict[str, Any]] = {
    # d not a multiple of c, batch of two, planted heavy hitters.
    "r3_partial_chunk": {
        "dim": 10_007,
        "rows": 3,
        "columns": 101,
        "seed": 1,
        "batch": 2,
        "spikes": 30,
    },
    # one chunk: the exact sketch.
    "r1_exact": {"dim": 3_000, "rows": 1, "columns": 3_001, "seed": 2, "spikes": 10},
    "r5_batch3": {
        "dim": 8_000,
        "rows": 5,
        "columns": 97,
        "seed": 3,
        "batch": 3,
        "spikes": 40,
        "k": 40,
    },
    # small c (below one program's block), many chunks per program.
    "r3_small_c": {"dim": 40, "rows": 3, "columns": 7, "seed": 4, "k": 5, "sample_size": 4},
    # large c: two chunks, the second partial; several programs per row.
    "r3_large_c": {"dim": 12_000, "rows": 3, "columns": 6_007, "seed": 5, "spikes": 20},
    # even r, and r beyond the min/max networks: the rank selection.
    "r2": {"dim": 2_000, "rows": 2, "columns": 53, "seed": 6, "spikes": 5, "sample_size": 128},
    "r4_ranked": {
        "dim": 3_000,
        "rows": 4,
        "columns": 61,
        "seed": 7,
        "spikes": 8,
        "sample_size": 128,
    },
    "r7_ranked": {
        "dim": 1_500,
        "rows": 7,
        "columns": 41,
        "seed": 8,
        "spikes": 6,
        "sample_size": 64,
    },
    # ties among the rows' estimates for the rank selection of general r.
    "r6_integers": {
        "dim": 1_000,
        "rows": 6,
        "columns": 37,
        "seed": 12,
        "kind": "integers",
        "sample_size": 32,
    },
    "r6_zeros": {
        "dim": 1_000,
        "rows": 6,
        "columns": 37,
        "seed": 13,
        "kind": "zeros",
        "sample_size": 32,
    },
    # the sample overrates the threshold's reach: fewer than k candidates, the fallback.
    "sampled_spikes": {
        "dim": 20_000,
        "rows": 3,
        "columns": 2_003,
        "seed": 9,
        "kind": "sampled",
        "k": 250,
        "sample_size": 64,
    },
    # all estimates tie at zero: the candidates overflow, the fallback.
    "zeros": {
        "dim": 10_000,
        "rows": 3,
        "columns": 101,
        "seed": 10,
        "kind": "zeros",
        "capacity": 100,
    },
    # a NaN cell: NaN estimates rank first, as in torch.topk.
    "nan": {
        "dim": 10_000,
        "rows": 1,
        "columns": 101,
        "seed": 11,
        "kind": "nan",
        "k": 200,
        "level_quantile": 0.999,
    },
}


@pytest.fixture(scope="session")
def outputs() -> dict[str, dict[str, torch.Tensor]]:
    cases = [{**BASE, **case} for case in CASES.values()]
    return dict(zip(CASES, run_interpreted(cases), strict=True))


def _case(name: str) -> dict[str, Any]:
    return {**BASE, **CASES[name]}


def _cpu_tables(sketch: CountSketch, x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    expected = tables.clone()
    for vector, table in zip(x, expected, strict=True):
        sketch.sketch(vector, out=table)
    return expected


@pytest.mark.parametrize("name", CASES)
def test_row_parallel_sketch_equals_the_cpu_tables_bit_for_bit(outputs, name: str) -> None:
    sketch, x, tables, _ = case_inputs(_case(name))
    assert torch.equal(outputs[name]["rows_parallel"], _cpu_tables(sketch, x, tables))


def _reassociation_bound(
    sketch: CountSketch, x: torch.Tensor, tables: torch.Tensor
) -> torch.Tensor:
    """2 gamma_n (|previous| + sum |t|) per cell, gamma_n = n u / (1 - n u), u = 2^-24: how far
    two orders of adding a cell's previous value and its at most n terms t can differ."""
    # |previous| + sum |t|: the sketch of |x| with every sign +1, in float64.
    buckets, _ = sketch.buckets_and_signs(torch.arange(sketch.dim))
    unsigned = tables.abs().double()
    for b in range(len(x)):
        unsigned[b].scatter_add_(1, buckets, x[b].abs().double().expand(sketch.rows, -1))
    u, n = 2.0**-24, sketch.chunks
    return 2 * n * u / (1 - n * u) * unsigned


@pytest.mark.parametrize("name", CASES)
def test_atomic_sketch_is_within_the_reassociation_bound(outputs, name: str) -> None:
    sketch, x, tables, _ = case_inputs(_case(name))
    expected = _cpu_tables(sketch, x, tables).double()
    bound = _reassociation_bound(sketch, x, tables)
    assert bool(((outputs[name]["atomic"].double() - expected).abs() <= bound).all())


@pytest.mark.parametrize("name", CASES)
def test_blocks_at_offsets_equal_the_cpu_block_sketch(outputs, name: str) -> None:
    """Three blocks sketched one after the other at their offsets: bit for bit the CPU's
    ``sketch_block_into``, and (atomic) within the bound of the whole vector's sketch."""
    sketch, x, tables, _ = case_inputs(_case(name))
    expected = tables.clone()
    for start, stop in block_bounds(sketch.dim):
        sketch_block_into(sketch, x[:, start:stop], start, expected)
    assert torch.equal(outputs[name]["blocks"], expected)
    whole = _cpu_tables(sketch, x, tables).double()
    bound = _reassociation_bound(sketch, x, tables)
    assert bool(((outputs[name]["blocks_atomic"].double() - whole).abs() <= bound).all())


@pytest.mark.parametrize("name", CASES)
def test_estimate_equals_the_cpu_estimate(outputs, name: str) -> None:
    sketch, _, _, table = case_inputs(_case(name))
    expected = sketch.estimate(table)
    got = outputs[name]["estimate"]
    finite = torch.isfinite(expected)
    assert torch.equal(got[finite], expected[finite])
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


@pytest.mark.parametrize("name", CASES)
def test_heavy_hitters_are_the_top_k_of_the_estimate(outputs, name: str) -> None:
    case = _case(name)
    sketch, _, _, table = case_inputs(case)
    estimate = sketch.estimate(table)
    indices, values = outputs[name]["heavy_indices"], outputs[name]["heavy_values"]
    assert indices.shape == values.shape == (case["k"],)
    assert len(set(indices.tolist())) == case["k"]
    assert torch.equal(values.nan_to_num(nan=7.0), estimate[indices].nan_to_num(nan=7.0))
    # The same set up to ties at the k-th magnitude: the same multiset of magnitudes.
    reference = estimate.abs().topk(case["k"]).values.nan_to_num(nan=float("inf"))
    got = values.abs().nan_to_num(nan=float("inf")).sort(descending=True).values
    assert torch.equal(got, reference)


@pytest.mark.parametrize("name", CASES)
def test_estimates_at_least_match_the_cpu_selection(outputs, name: str) -> None:
    case = _case(name)
    sketch, _, _, table = case_inputs(case)
    out = outputs[name]
    level = float(out["level"])
    count = int(out["found_count"])
    expected_indices, _ = estimates_at_least(sketch, table, level)
    expected_nan = torch.isnan(sketch.estimate(table)).nonzero().flatten()
    expected = set(expected_indices.tolist()) | set(expected_nan.tolist())
    assert count == len(expected)
    kept = min(count, case["capacity"])
    found = out["found_indices"][:kept]
    assert len(set(found.tolist())) == kept and set(found.tolist()) <= expected
    if count <= case["capacity"]:
        assert set(found.tolist()) == expected
    estimate = sketch.estimate(table)
    assert torch.equal(
        out["found_values"][:kept].nan_to_num(nan=7.0), estimate[found].nan_to_num(nan=7.0)
    )


def test_the_fallback_cases_do_fall_back(outputs) -> None:
    """The cases meant to exercise the fallback do leave too few or too many candidates."""
    sampled = _case("sampled_spikes")
    sketch, _, _, table = case_inputs(sampled)
    estimate = sketch.estimate(table).abs()
    # the threshold is the sample's rank-th largest magnitude: only spiked coordinates reach it
    spiked = estimate[:: sampled["dim"] // sampled["sample_size"]]
    assert int((estimate >= spiked.min()).sum()) < sampled["k"]
    assert int(outputs["zeros"]["found_count"]) > _case("zeros")["capacity"]


def test_bad_shapes_are_refused_before_any_launch() -> None:
    from sketchcomm import sketch_triton

    sketch = CountSketch(100, 3, 11)
    with pytest.raises(ValueError, match="contiguous"):
        sketch_triton.sketch_into(sketch, torch.zeros(2, 100), torch.zeros(2, 3, 12))
    with pytest.raises(ValueError, match="fp32"):
        x = torch.zeros(1, 100, dtype=torch.float64)
        sketch_triton.sketch_into(sketch, x, sketch.zeros()[None])
    with pytest.raises(ValueError, match="out must be"):
        sketch_triton.estimate_into(sketch, sketch.zeros(), torch.empty(99))
    with pytest.raises(ValueError, match="k must be"):
        sketch_triton.heavy_hitters(sketch, sketch.zeros(), 0)
    assert not sketch_triton.supported(torch.zeros(3))


# The pointer arguments' types; every other argument that is not a constexpr is an int32.
_POINTERS = {
    "x": "*fp32",
    "tables": "*fp32",
    "table": "*fp32",
    "offsets": "*i32",
    "signs": "*fp32",
    "out": "*fp32",
    "threshold": "*fp32",
    "counter": "*i32",
    "indices": "*i64",
    "values": "*fp32",
}
# The constexpr values of every variant that the launches use.
_VARIANTS = {
    "sketch_rows": [{"BLOCK": 256, "UNROLL": 8}],
    "sketch_atomic": [{"ROWS": 3, "BLOCK": 1024}],
    "estimate": [
        {"ROWS": rows, "ROWS_P2": padded, "BLOCK": block}
        for rows, padded, block in (
            (1, 1, 1024),
            (2, 2, 1024),
            (3, 4, 1024),
            (5, 8, 1024),
            (4, 4, 256),
            (7, 8, 256),
        )
    ],
    "compact": [{"ROWS": 3, "ROWS_P2": 4, "BLOCK": 2048}, {"ROWS": 6, "ROWS_P2": 8, "BLOCK": 512}],
}


@pytest.mark.skipif(
    bool(os.environ.get("TRITON_INTERPRET")), reason="compiles the kernels, not interpreted"
)
@pytest.mark.parametrize("name", _VARIANTS)
def test_kernels_compile_to_a_hopper_binary(name: str) -> None:
    """Without a GPU, every kernel variant that the launches use compiles through Triton's
    whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) for sm_90, which the interpreter never does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sketchcomm import sketch_triton_kernels

    kernel = getattr(sketch_triton_kernels, f"{name}_kernel")
    for constants in _VARIANTS[name]:
        signature = {
            arg: "constexpr" if arg in constants else _POINTERS.get(arg, "i32")
            for arg in kernel.arg_names
        }
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        options = {"enable_fp_fusion": False}  # as the launches
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"]
