"""The engine's failure path on real gloo ranks: when one rank's hook raises, every rank raises
promptly with the cause, and no raw gradient survives a refused private step (issue 11, point 7).
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import SketchState, sketch_hook
from sketchcomm.demo.digits import load_digits, make_mlp
from sketchcomm.privacy import DPSketchState, PrivacyBudgetExceeded, PrivacyLedger

# Far below the process group's 30-minute default: a rank left waiting would fail the test.
PROMPT = 120.0


def _private_state(budget: float | None = None) -> DPSketchState:
    return DPSketchState(
        PrivacyLedger(accountant="rdp", delta=1e-5, budget=budget),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=1437,
        noise_multiplier=1.0,
        compression=5,
        min_compression_size=1000,
    )


def _outcome(action) -> dict:
    try:
        action()
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


def _cleared(model: nn.Module) -> bool:
    return all(p.grad is None or not p.grad.any() for p in model.parameters())


def _step_changes_nothing(model: nn.Module) -> bool:
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def bad_input_worker(rank: int, world: int, bucket_view: bool) -> dict:
    """After one good step, rank 1 alone runs a micro-batch under no_sync and zeroes the
    gradients before the next, so its per-example gradients do not add up to the rebuilt
    buckets' gradients: its hook raises ValueError in the middle of the step, rank 0's hook runs
    fine."""
    data = load_digits()
    model = DDP(make_mlp(hidden=64), bucket_cap_mb=0.01, gradient_as_bucket_view=bucket_view)
    state = _private_state()
    state.register(model)
    loss = nn.CrossEntropyLoss(reduction="sum")
    loss(model(data.x_train[:8]), data.y_train[:8]).backward()  # DDP then rebuilds its buckets
    model.zero_grad()
    if rank == 1:
        with model.no_sync():
            loss(model(data.x_train[:8]), data.y_train[:8]).backward()
        model.zero_grad()
    rows = slice(8 + 8 * rank, 16 + 8 * rank)
    result = _outcome(lambda: loss(model(data.x_train[rows]), data.y_train[rows]).backward())
    return {
        **result,
        "buckets": len(state.buckets),
        "cleared": _cleared(model),
        "unchanged": _step_changes_nothing(model),
        "steps": state.ledger.steps,
    }


def budget_worker(rank: int, world: int, bucket_view: bool) -> dict:
    """A budget too small for one step: refused on every rank, raw gradients cleared."""
    data = load_digits()
    model = DDP(make_mlp(hidden=64), bucket_cap_mb=0.01, gradient_as_bucket_view=bucket_view)
    state = _private_state(budget=1e-3)
    state.register(model)
    rows = slice(8 * rank, 8 * rank + 8)
    result = _outcome(
        lambda: nn.functional.cross_entropy(
            model(data.x_train[rows]), data.y_train[rows], reduction="sum"
        ).backward()
    )
    return {
        **result,
        "is_budget": result["type"] == PrivacyBudgetExceeded.__name__,
        "cleared": _cleared(model),
        "unchanged": _step_changes_nothing(model),
        "steps": state.ledger.steps,
    }


def broken_sketch_hook(
    state: SketchState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """:func:`sketch_hook` with a bug on rank 1: its first bucket's table has the wrong shape."""
    if dist.get_rank() != 1 or bucket.index() != 0:
        return sketch_hook(state, bucket)
    context = state.open(bucket)
    table = context.build(context.sketch.table_shape, lambda: torch.zeros(3))
    context.record(table.numel(), table.numel() * 4)
    return context.allreduce(table, lambda summed: summed.flatten())


def bug_worker(rank: int, world: int) -> dict:
    data = load_digits()
    model = DDP(make_mlp(hidden=64), bucket_cap_mb=0.01)
    state = SketchState(compression=5, min_compression_size=1000, start_iter=0)
    state.register(model, broken_sketch_hook)
    loss = nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8])
    result = _outcome(loss.backward)
    # Every collective of the failed step was matched: the group still works.
    total = torch.ones(1)
    dist.all_reduce(total)
    return {**result, "cleared": _cleared(model), "group_works": total.item() == world}


@pytest.mark.parametrize("bucket_view", [False, True])
def test_one_rank_failing_makes_every_rank_raise_with_the_cause(bucket_view: bool) -> None:
    failing, healthy = run_ranks(bad_input_worker, 2, bucket_view, timeout=PROMPT)[::-1]
    assert failing["type"] == "ValueError" and "do not add up" in failing["message"]
    assert healthy["type"] == "RuntimeError", healthy
    assert "rank 1 raised ValueError" in healthy["message"]
    for result in (failing, healthy):
        assert result["buckets"] >= 2
        assert result["cleared"] and result["unchanged"]
        assert result["steps"] == 2  # recorded before the refusal: over-reporting is safe


@pytest.mark.parametrize("bucket_view", [False, True])
def test_refused_step_leaves_no_raw_gradient(bucket_view: bool) -> None:
    for result in run_ranks(budget_worker, 2, bucket_view, timeout=PROMPT):
        assert result["is_budget"], result
        assert result["cleared"] and result["unchanged"]
        assert result["steps"] == 0


def test_bug_on_one_rank_is_named_on_the_other_and_every_collective_matched() -> None:
    healthy, failing = run_ranks(bug_worker, 2, timeout=PROMPT)
    assert failing["type"] == "RuntimeError" and "message where" in failing["message"]
    assert "rank 1 raised RuntimeError" in healthy["message"]
    for result in (healthy, failing):
        assert result["cleared"] and result["group_works"]
