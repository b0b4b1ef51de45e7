"""dp_sketch_hook on real gloo process groups: noise scale, per-example clipping against a
one-process reference, ledger stepping, budget refusal and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.demo.digits import load_digits, make_mlp
from sketchcomm.privacy import DPSketchState, PrivacyBudgetExceeded, PrivacyLedger


class Target(nn.Module):
    """loss = <w, t> through a Linear layer without bias: the gradient of w is t."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.layer.weight)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return self.layer(target).sum()


def _ledger(**kwargs) -> PrivacyLedger:
    return PrivacyLedger(accountant="rdp", delta=1e-5, **kwargs)


# ---------------------------------------------------------------------------- workers
def noise_worker(rank: int, world: int, noise: str, unit: str, colluding: int | None) -> dict:
    """Zero gradients, exact one-row tables (the bucket is below min_compression_size): the
    output is the aggregate noise divided by the normalizer, one independent cell per
    coordinate."""
    dim, sigma, clip = 20_000, 1.5, 2.0
    model = DDP(Target(dim))
    sampling = {"sample_rate": 0.01, "dataset_size": 1000} if unit == "example" else {}
    state = DPSketchState(
        _ledger(unit=unit),
        max_grad_norm=clip,
        unit=unit,
        noise_multiplier=sigma,
        noise_placement=noise,
        colluding_ranks=colluding,
        min_compression_size=10**9,
        **sampling,
    )
    state.register(model)
    draws = []
    for _ in range(3):
        model.zero_grad()
        model(torch.zeros(1, dim)).backward()
        draws.append(model.module.layer.weight.grad.flatten() * state.normalizer)
    shares = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(shares, torch.randn(1, generator=state.generator))
    return {
        "std": torch.cat(draws).std().item(),
        "expected": sigma * clip,
        "shares_differ": len({s.item() for s in shares}) == world,
        "steps": state.ledger.steps,
    }


def example_worker(rank: int, world: int, sigma: float) -> dict:
    """unit='example' on the digits MLP, 8 examples per rank, dense median recovery."""
    data = load_digits()
    x, y = data.x_train[rank * 8 : (rank + 1) * 8], data.y_train[rank * 8 : (rank + 1) * 8]
    model = DDP(make_mlp(hidden=32, seed=3))
    state = DPSketchState(
        _ledger(),
        max_grad_norm=0.5,
        unit="example",
        sample_rate=16 / 1437,
        dataset_size=1437,
        noise_multiplier=sigma,
        compression=5,
        recovery="dense",
        rows=3,
        min_compression_size=1000,
    )
    state.register(model)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    # canonical order: parameters by descending position in the model
    grad = torch.cat([p.grad.flatten() for p in reversed(list(model.parameters()))])
    return {
        "grad": grad,
        "sketch": state.buckets[0].sketch,
        "normalizer": state.normalizer,
        "clip": state.max_grad_norm,
        "steps": state.ledger.steps,
    }


def reference_example_update(results: list[dict], world: int) -> torch.Tensor:
    """The same release computed in one process: per-example gradients by autograd, one example
    at a time, sketched, clipped to C (one bucket), summed over both ranks' examples."""
    data = load_digits()
    model = make_mlp(hidden=32, seed=3)
    sketch = results[0]["sketch"]
    total = sketch.zeros()
    for rank in range(world):
        for i in range(rank * 8, (rank + 1) * 8):
            model.zero_grad()
            nn.functional.cross_entropy(
                model(data.x_train[i : i + 1]), data.y_train[i : i + 1]
            ).backward()
            g = torch.cat([p.grad.flatten() for p in reversed(list(model.parameters()))])
            table = sketch.sketch(g)
            total += table * min(1.0, results[0]["clip"] / (table.norm().item() + 1e-6))
    return sketch.estimate(total) / results[0]["normalizer"]


def buckets_worker(rank: int, world: int) -> dict:
    """Many buckets, several steps: the ledger steps once per optimizer step."""
    data = load_digits()
    model = DDP(make_mlp(hidden=256), bucket_cap_mb=0.05)
    state = DPSketchState(
        _ledger(),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.02,
        dataset_size=1437,
        noise_multiplier=1.0,
        compression=10,
    )
    state.register(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        index = torch.arange(step * 16 + rank * 8, step * 16 + rank * 8 + 8)
        opt.zero_grad()
        nn.functional.cross_entropy(
            model(data.x_train[index]), data.y_train[index], reduction="sum"
        ).backward()
        opt.step()
    return {"buckets": len(state.buckets), "steps": state.ledger.steps, "iter": state.iter}


def budget_worker(rank: int, world: int, path: str) -> dict:
    data = load_digits()
    model = DDP(make_mlp(hidden=32))
    ledger = _ledger(budget=1.0, path=path if rank == 0 else None)
    state = DPSketchState(
        ledger,
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.05,
        dataset_size=1437,
        noise_multiplier=1.5,
        min_compression_size=10**9,
    )
    state.register(model)
    released = 0
    for step in range(50):
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad()
        index = torch.arange(step * 8, step * 8 + 8)
        try:
            nn.functional.cross_entropy(
                model(data.x_train[index]), data.y_train[index], reduction="sum"
            ).backward()
        except PrivacyBudgetExceeded as error:
            unchanged = all(
                torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)
            )
            return {
                "released": released,
                "steps": ledger.steps,
                "epsilon": ledger.epsilon,
                "refused": str(error),
                "unchanged": unchanged,
            }
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        released += 1
    return {"released": released}


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("world", "noise", "unit", "colluding", "factor"),
    [
        (2, "distributed", "rank", 0, 1.0),
        (2, "distributed", "rank", None, math.sqrt(2.0)),  # t = W - 1: shares sigma^2 C^2 / 1
        (3, "distributed", "rank", 1, math.sqrt(1.5)),  # shares sigma^2 C^2 / 2
        (2, "single", "example", None, 1.0),
    ],
)
def test_aggregate_noise_has_std_sigma_c(
    world: int, noise: str, unit: str, colluding: int | None, factor: float
) -> None:
    """60,000 cells: the sample std of a Gaussian has relative standard error 1/sqrt(2n), about
    0.3%; the tolerance is 3%. The aggregate carries sigma C sqrt(W / (W - t)), so that any t
    shares removed leave sigma C; shared seeds would give another factor sqrt(W)."""
    for result in run_ranks(noise_worker, world, noise, unit, colluding):
        assert abs(result["std"] / (factor * result["expected"]) - 1) < 0.03, result
        assert result["shares_differ"]
        assert result["steps"] == 3


def test_per_example_clipping_equals_one_process_reference() -> None:
    results = run_ranks(example_worker, 2, 0.0)
    expected = reference_example_update(results, 2)
    for result in results:
        torch.testing.assert_close(result["grad"], expected, rtol=1e-4, atol=1e-6)
        assert result["steps"] == 1


def test_per_example_noise_has_the_stated_scale() -> None:
    """With sigma = 1 the release differs from the noise-free reference by sketch-space noise of
    std sigma C per cell; through the median of 3 rows and the division by q N, the output noise
    has std between 0.3 and 1 times sigma C / (q N)."""
    results = run_ranks(example_worker, 2, 1.0)
    expected = reference_example_update(results, 2)
    scale = results[0]["clip"] / results[0]["normalizer"]
    ratio = (results[0]["grad"] - expected).std().item() / scale
    assert 0.3 < ratio < 1.0, ratio
    torch.testing.assert_close(results[0]["grad"], results[1]["grad"])


def test_ledger_steps_once_per_optimizer_step_with_many_buckets() -> None:
    for result in run_ranks(buckets_worker, 2):
        assert result["buckets"] >= 2
        assert result["steps"] == result["iter"] == 4


def test_step_over_budget_is_refused_before_release(tmp_path) -> None:
    path = str(tmp_path / "ledger.json")
    results = run_ranks(budget_worker, 2, path)
    for result in results:
        assert "refused" in result, result
        assert result["unchanged"]
        assert result["steps"] == result["released"] and result["epsilon"] <= 1.0
    assert results[0]["released"] == results[1]["released"] > 0
    reloaded = PrivacyLedger(accountant="rdp", delta=1e-5, path=path)
    assert reloaded.steps == results[0]["released"]


def test_unsupported_layer_is_refused_when_registered() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    state = DPSketchState(
        _ledger(),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=1000,
        noise_multiplier=1.0,
    )
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\) .*GroupNorm"):
        state.register(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"unit": "user"}, "unit"),
        ({"unit": "rank", "dataset_size": None}, "ledger accounts for unit='example'"),
        ({"noise_placement": "each"}, "noise_placement"),
        ({"noise": "single"}, "noise_placement"),
        ({"sample_rate": None}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"dataset_size": 10**6}, "delta"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": None}, "target_epsilon"),
        ({"target_epsilon": 4.0}, "not both"),
        ({"error_feedback": "local"}, "not private"),
        ({"second_round": True}, "second_round"),
        ({"start_iter": 3}, "start_iter"),
        ({"compression": 0.5}, "compression"),
        ({"secure_mode": 1}, "secure_mode"),
        ({"secure_mode": True}, "ledger declares secure_mode=False"),
        ({"colluding_ranks": -1}, "colluding_ranks"),
    ],
)
def test_invalid_private_configuration(kwargs: dict, message: str) -> None:
    arguments = {
        "max_grad_norm": 1.0,
        "unit": "example",
        "sample_rate": 0.01,
        "dataset_size": 1000,
        "noise_multiplier": 1.0,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        DPSketchState(_ledger(), **arguments)


def test_calibrated_noise_reaches_the_target() -> None:
    state = DPSketchState(
        _ledger(),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=10_000,
        target_epsilon=4.0,
        steps=500,
    )
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(state.noise_multiplier, 0.01, 500)]
    assert 3.9 < accountant.get_epsilon(1e-5) <= 4.0
    assert "4" in state.describe(500) and not math.isnan(state.noise_multiplier)
