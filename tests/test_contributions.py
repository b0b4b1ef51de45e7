"""Per-example contributions of private DDP steps on two gloo ranks, sigma = 0, against the
one-process reference (torch.func per-example gradients clipped in sketch space): gradient
accumulation over micro-batches, streaming once the bucket layouts are stable, bf16 autocast."""

from __future__ import annotations

import torch
from distributed import run_ranks
from private_reference import make_model, private_worker, reference_release, summed_loss
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.privacy import DPSketchState, PrivacyLedger
from sketchcomm.privacy.contributions import ExampleContributions, sum_tolerance
from sketchcomm.sketch import CountSketch
from sketchcomm.sketch_blocks import sketch_block_into

MLP = {
    "model": "mlp",
    "size": 4,
    "clip": 0.5,
    "compression": 4,
    "min_compression_size": 600,
    "bucket_cap_mb": 0.004,
}


def _released(results: list[dict], step: int) -> list[torch.Tensor]:
    """Every bucket's allreduced clipped sum (sigma = 0: the release)."""
    per_rank = [r["steps"][step]["released"] for r in results]
    return [sum(tables) for tables in zip(*per_rank, strict=True)]


def test_micro_batches_are_clipped_per_example_and_released_once() -> None:
    """3 micro-batches of 4 under no_sync + 1 synced, per rank, for 4 logical steps: each step's
    release is the sum over all 16 examples of clipped per-example tables, the ledger steps once
    per release, and from the step after DDP's rebuild the gradients are sketched as captured."""
    spec = {**MLP, "micro": 4, "steps": 4}
    results = run_ranks(private_worker, 2, spec)
    assert [r["ledger_steps"] for r in results] == [4, 4]
    streaming = [s["streaming"] for s in results[0]["steps"]]
    assert streaming[0] is False and streaming[-1] is True
    for step in range(4):
        reference = reference_release(spec, results[0]["steps"][step], step, 2)
        released = _released(results, step)
        assert len(released) == len(reference) > (step > 0)  # DDP's rebuild: many buckets
        assert any(r.shape[0] > 1 for r in reference)  # real sketches, not only exact tables
        unclipped = reference_release(spec, results[0]["steps"][step], step, 2, clipped=False)
        assert any(
            (u - r).norm() > 0.1 * r.norm() for u, r in zip(unclipped, reference, strict=True)
        )
        for got, expected in zip(released, reference, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert all(r["steps"][step]["held_after"] == 0 for r in results)


def test_bf16_autocast_step_matches_the_float32_reference() -> None:
    spec = {**MLP, "micro": 1, "steps": 4, "autocast": True}
    results = run_ranks(private_worker, 2, spec)
    assert results[0]["steps"][-1]["streaming"]
    for step in range(4):
        reference = reference_release(spec, results[0]["steps"][step], step, 2)
        for got, expected in zip(_released(results, step), reference, strict=True):
            error = (got - expected).norm() / expected.norm()
            assert error < 2 * sum_tolerance(torch.bfloat16) / 8  # a few bf16 epsilons
            assert error > 0  # the step really ran in bf16


def test_tolerance_follows_the_dtype() -> None:
    assert sum_tolerance(torch.float32) == 1e-3
    assert sum_tolerance(torch.bfloat16) == 8 * torch.finfo(torch.bfloat16).eps
    assert sum_tolerance(torch.float16) == 8 * torch.finfo(torch.float16).eps


def test_sketching_blocks_at_offsets_adds_up_to_the_sketch() -> None:
    sketch = CountSketch(dim=1000, rows=3, columns=101, seed=4)
    vectors = torch.randn(5, 1000)
    tables = torch.zeros(5, 3, 101)
    for start, end in ((0, 7), (7, 101), (101, 500), (500, 1000)):
        sketch_block_into(sketch, vectors[:, start:end], start, tables)
    torch.testing.assert_close(tables, sketch.sketch_batch(vectors), rtol=1e-6, atol=1e-6)


def test_without_a_bucket_rows_are_kept_per_micro_batch_and_cleared() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    contributions = ExampleContributions(model)
    model(torch.randn(4, 6)).sum().backward()
    model(torch.randn(3, 6)).sum().backward()
    with torch.no_grad():
        model(torch.randn(2, 6))  # evaluation: no micro-batch
    assert sorted(b.size for b in contributions.pending.values()) == [3, 4]
    assert contributions.held_bytes() == (4 + 3) * (30 + 5 + 15 + 3) * 4
    contributions.clear()
    assert contributions.held_bytes() == 0
    contributions.remove()


def zeroed_between_micro_batches(rank: int, world: int) -> dict:
    """Gradients zeroed between two micro-batches: the first one's examples are in the
    contributions but not in the bucket's gradient, so the step is refused and cleared."""
    model = DDP(make_model("mlp"))
    state = DPSketchState(
        PrivacyLedger(accountant="rdp", delta=1e-5, unit="example"),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=10_000,
        noise_multiplier=1.0,
        min_compression_size=10**9,
    )
    state.register(model)
    with model.no_sync():
        summed_loss("mlp", model(torch.randn(4, 64)), torch.zeros(4, dtype=torch.long)).backward()
    model.zero_grad()
    message = "no error"
    try:
        summed_loss("mlp", model(torch.randn(4, 64)), torch.ones(4, dtype=torch.long)).backward()
    except ValueError as error:
        message = str(error)
    held = state.contributions.held_bytes()
    return {"message": message, "held": held, "steps": state.ledger.steps}


def test_gradients_zeroed_between_micro_batches_are_refused() -> None:
    for result in run_ranks(zeroed_between_micro_batches, 2):
        assert "do not add up" in result["message"] and "between" in result["message"]
        assert result["held"] == 0
        assert result["steps"] == 1  # the refused step counts (over-reporting is safe)
