"""sketch_hook on real gloo process groups, against plain allreduce and one-process references."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from digits_training import train_digits
from distributed import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.demo.digits import load_digits, make_mlp, rank_batches
from sketchcomm.hooks import SketchState, sketch_hook
from sketchcomm.sketch import CountSketch


def _rank_vector(rank: int, dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(100 + rank))


class SparseTarget(nn.Module):
    """loss = <p, t>: the gradient of ``p`` is exactly ``t``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(dim))

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return (self.p * target).sum()


def _sparse_target(rank: int, dim: int, nonzeros: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    t = torch.zeros(dim)
    t[torch.randperm(dim, generator=g)[:nonzeros]] = torch.randn(nonzeros, generator=g) + 3.0
    return t


# ---------------------------------------------------------------------------- workers
def linearity_worker(rank: int, world: int) -> float:
    cs = CountSketch(100_000, 3, 1999, seed=11)
    table = cs.sketch(_rank_vector(rank, 100_000))
    dist.all_reduce(table)
    total = sum(_rank_vector(r, 100_000) for r in range(world))
    return (table - cs.sketch(total)).abs().max().item()


def exact_worker(rank: int, world: int) -> dict[str, float]:
    """Sketch as large as every bucket, one row, no error feedback: equals plain DDP."""
    data = load_digits()
    x, y = data.x_train[rank * 64 : (rank + 1) * 64], data.y_train[rank * 64 : (rank + 1) * 64]
    variants = {
        "default": {},
        "bucket_view": {"gradient_as_bucket_view": True},
        "static_graph": {"static_graph": True},
        "many_buckets": {"bucket_cap_mb": 0.01},
    }
    errors = {}
    for name, ddp_kwargs in variants.items():
        grads = []
        for use_sketch in (False, True):
            model = DDP(make_mlp(hidden=48, seed=1), **ddp_kwargs)
            if use_sketch:
                state = SketchState(
                    rows=1, columns=7001, recovery="dense", error_feedback="none", start_iter=0
                )
                model.register_comm_hook(state, sketch_hook)
            for _ in range(3):  # also past DDP's bucket rebuild
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if name == "many_buckets":
            assert len(state.buckets) > 1
        errors[name] = (grads[0] - grads[1]).abs().max().item()
    return errors


def sparse_worker(rank: int, world: int, second_round: bool) -> float:
    """Each rank's gradient has 5 non-zeros in 60,000; the table has 5 rows of 1,999 columns.

    Without a second round, recovery is exact when no zero coordinate collides with non-zeros in
    3 of its 5 rows and no non-zero in 3 of 5 rows: with 10 non-zeros this fails with probability
    about 60,000 * 10 * (10 / 1999)^3, under 8%, over the seeds (this seed is one that works;
    the bound says how rare the others are). With a second round of 2k candidates, the exact
    values drop any false candidate.
    """
    dim, nonzeros = 60_000, 5
    model = DDP(SparseTarget(dim))
    state = SketchState(
        compression=6,
        rows=5,
        recovery="topk",
        topk_fraction=world * nonzeros / dim,
        second_round=second_round,
        error_feedback="none",
        start_iter=0,
    )
    model.register_comm_hook(state, sketch_hook)
    target = _sparse_target(rank, dim, nonzeros)
    model(target).backward()
    expected = target.clone()
    dist.all_reduce(expected)
    expected /= world
    assert state.stats.compressed_buckets == 1
    return (model.module.p.grad - expected).abs().max().item()


def accuracy_worker(rank: int, world: int) -> dict[str, float]:
    steps = 300
    results = {"allreduce": train_digits("allreduce", steps=steps)["test_accuracy"]}
    sketched = train_digits("sketch", steps=steps, compression=10)
    results["sketch"] = sketched["test_accuracy"]
    results["ratio"] = sketched["bytes_allreduce_per_step"] / sketched["bytes_sent_per_step"]
    return results


def _train_steps(model, optimizer, start, stop, rank, world):
    data = load_digits()
    batches = rank_batches(len(data.x_train), 32, rank, world, seed=0)
    for step in range(start, stop):
        index = batches(step)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()


def resume_worker(rank: int, world: int, sketch_kwargs: dict) -> float:
    def fresh():
        model = DDP(make_mlp(hidden=256, seed=0))
        state = SketchState(start_iter=2, **sketch_kwargs)
        state.register(model)  # binds parameters: state survives the bucket rebuild
        return model, state, torch.optim.SGD(model.parameters(), lr=0.1)

    model, state, opt = fresh()
    _train_steps(model, opt, 0, 8, rank, world)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
        buffer,
    )
    _train_steps(model, opt, 8, 16, rank, world)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model, state, opt = fresh()
    model.module.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    state.load_state_dict(checkpoint["hook"])
    assert state.iter == 8
    _train_steps(model, opt, 8, 16, rank, world)
    assert state.stats.state_resets == 0
    pairs = zip(uninterrupted, model.parameters(), strict=True)
    return max((a - b).abs().max().item() for a, b in pairs)


def mismatch_worker(rank: int, world: int, field: str) -> str:
    kwargs = {"start_iter": 0, "compression": 10}
    kwargs[field] = {"seed": [1, 2], "compression": [10, 12], "rows": [3, 5]}[field][rank]
    model = DDP(make_mlp(hidden=256))
    model.register_comm_hook(SketchState(**kwargs), sketch_hook)
    data = load_digits()
    try:
        nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8]).backward()
    except ValueError as error:
        return str(error)
    return "no error"


def nonfinite_worker(rank: int, world: int, mode: str) -> dict:
    dim = 40_000
    model = DDP(SparseTarget(dim))
    state = SketchState(compression=10, start_iter=0, nonfinite=mode)
    model.register_comm_hook(state, sketch_hook)
    model(_sparse_target(rank, dim, 10)).backward()
    error_table = state.buckets[0].error_table.clone()
    bad = _sparse_target(rank, dim, 10)
    if rank == 1:
        bad[5] = float("nan")
    model.zero_grad()
    try:
        model(bad).backward()
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "all_nan": bool(model.module.p.grad.isnan().all()),
        "count": state.stats.nonfinite_buckets,
        "error_kept": bool(torch.equal(state.buckets[0].error_table, error_table)),
    }


def dtype_worker(rank: int, world: int, dtype_name: str) -> float:
    dtype = getattr(torch, dtype_name)
    dim = 30_000
    model = DDP(SparseTarget(dim).to(dtype))
    state = SketchState(
        rows=1, columns=30_011, recovery="dense", error_feedback="none", start_iter=0
    )
    model.register_comm_hook(state, sketch_hook)
    target = _rank_vector(rank, dim).to(dtype)
    model(target).backward()
    grad = model.module.p.grad
    assert grad.dtype == dtype
    expected = sum(_rank_vector(r, dim).to(dtype).float() for r in range(world)) / world
    return ((grad.float() - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------- tests
def test_linearity_of_allreduced_tables() -> None:
    assert max(run_ranks(linearity_worker, 2)) < 1e-4


def test_full_size_sketch_equals_plain_allreduce() -> None:
    for errors in run_ranks(exact_worker, 2):
        assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("second_round", [False, True])
def test_sparse_gradient_recovered_exactly(second_round: bool) -> None:
    assert max(run_ranks(sparse_worker, 2, second_round)) < 1e-5


def test_world_size_one() -> None:
    assert run_ranks(sparse_worker, 1, False)[0] < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_buckets(dtype: str) -> None:
    tolerance = {"float16": 2e-3, "bfloat16": 1e-2}[dtype]
    assert max(run_ranks(dtype_worker, 2, dtype)) < tolerance


@pytest.mark.slow
def test_training_at_10x_matches_allreduce_accuracy() -> None:
    """Digits MLP, 300 seeded steps, 2 ranks: the sketch at 10x ends within 3 points of
    allreduce's test accuracy (allreduce reaches about 97%)."""
    for result in run_ranks(accuracy_worker, 2):
        assert result["ratio"] >= 9.5
        assert result["allreduce"] > 0.9
        assert result["sketch"] >= result["allreduce"] - 0.03, result


@pytest.mark.parametrize(
    "sketch_kwargs",
    [
        {"compression": 10},
        {"compression": 10, "second_round": True},
        {"compression": 10, "error_feedback": "sketch", "momentum": 0.9},
        {"compression": 10, "recovery": "dense"},
    ],
)
def test_checkpoint_resume_continues_exactly(sketch_kwargs: dict) -> None:
    assert max(run_ranks(resume_worker, 2, sketch_kwargs)) == 0.0


@pytest.mark.parametrize("field", ["seed", "compression", "rows"])
def test_configuration_differing_across_ranks_is_a_clear_error(field: str) -> None:
    messages = run_ranks(mismatch_worker, 2, field)
    for message in messages:
        assert "differs across ranks" in message, message
    expected = {"seed": "seed ranges from 1 to 2", "compression": "columns", "rows": "rows"}[field]
    assert expected in messages[0]


def test_nonfinite_gradient_propagates_as_nan() -> None:
    for result in run_ranks(nonfinite_worker, 2, "propagate"):
        assert result == {"all_nan": True, "count": 1, "error_kept": True}


def test_nonfinite_gradient_can_raise() -> None:
    for result in run_ranks(nonfinite_worker, 2, "raise"):
        assert "non-finite gradient in bucket 0" in result["error"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"compression": 1.0}, "compression"),
        ({"compression": float("nan")}, "compression"),
        ({"rows": 0}, "rows"),
        ({"columns": 0}, "columns"),
        ({"recovery": "mean"}, "recovery"),
        ({"topk_fraction": 0.0}, "topk_fraction"),
        ({"topk_fraction": 1.5}, "topk_fraction"),
        ({"second_round": 1}, "second_round"),
        ({"second_round": True, "recovery": "dense"}, "second_round"),
        ({"error_feedback": "global"}, "error_feedback"),
        ({"momentum": 0.9, "second_round": True}, "momentum"),
        ({"error_feedback": "local"}, "second_round"),
        ({"recovery": "dense", "error_feedback": "sketch"}, "error_feedback"),
        ({"momentum": 1.0, "error_feedback": "sketch"}, "momentum"),
        ({"start_iter": -1}, "start_iter"),
        ({"min_compression_size": 0}, "min_compression_size"),
        ({"seed": -3}, "seed"),
        ({"log_every": 1.5}, "log_every"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_invalid_configuration_names_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SketchState(**kwargs)


def test_state_pickles_without_process_group() -> None:
    state = SketchState(compression=10)
    clone = copy.deepcopy(state)
    assert clone.config == state.config
    with pytest.raises(ValueError, match="compression"):
        SketchState(compression=12).load_state_dict(state.state_dict())
