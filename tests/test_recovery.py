"""FetchSGD recovery that keeps every coordinate (``k >= d``): computed as the median estimate with
both sketch-space tables zeroed whole, it is bit for bit the general top-k path (select all ``d``
coordinates, zero the cells they hash to), step after step, in canonical and in buffer order."""

from __future__ import annotations

import pytest
import torch

from sketchcomm.buckets import BucketState
from sketchcomm.placement import Placement
from sketchcomm.recovery import DecodeConfig, decode, decode_into
from sketchcomm.sketch import CountSketch


def _reference_steps(sketch: CountSketch, tables: list[torch.Tensor], momentum: float) -> list:
    """The general FetchSGD step with ``k = d``, written out: momentum and error on the table,
    the ``d`` heavy hitters, their cells zeroed in both tables."""
    error, velocity = torch.zeros_like(tables[0]), torch.zeros_like(tables[0])
    results = []
    for table in tables:
        velocity.mul_(momentum).add_(table)
        error.add_(velocity)
        indices, values = sketch.heavy_hitters(error, sketch.dim)
        update = torch.zeros(sketch.dim)
        update[indices] = values
        sketch.zero_cells(error, indices, velocity)
        results.append((update, error.clone(), velocity.clone()))
    return results


@pytest.mark.parametrize("rows", [1, 3])
def test_keeping_every_coordinate_is_the_general_top_k_bit_for_bit(rows: int) -> None:
    dim, columns, momentum = 5000, 101, 0.9
    sketch = CountSketch(dim, rows, columns, seed=3)
    generator = torch.Generator().manual_seed(0)
    tables = [sketch.sketch(torch.randn(dim, generator=generator) ** 3) for _ in range(3)]
    expected = _reference_steps(sketch, tables, momentum)
    config = DecodeConfig("topk", "sketch", momentum)
    bucket = BucketState(("all",), sketch, topk=dim, candidates=dim)
    placed = BucketState(("all",), sketch, topk=dim, candidates=dim)
    placement = Placement(((0, 1200), (3000, 2000), (1200, 1800)), dim)
    for table, (update, error, velocity) in zip(tables, expected, strict=True):
        assert torch.equal(decode(config, bucket, table.clone()), update)
        assert torch.equal(bucket.error_table, error) and torch.equal(
            bucket.momentum_table, velocity
        )
        target = torch.full((dim,), float("nan"))
        decode_into(config, placed, table.clone(), target, placement)
        assert torch.equal(placement.gather(target), update)
        assert torch.equal(placed.error_table, error)
    assert not bucket.error_table.any() and not bucket.momentum_table.any()
