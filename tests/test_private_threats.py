"""What a privacy auditor would try against the private hook, on real gloo ranks: ranks that must
sit out steps in secret (``unit="rank"``, ``q < 1``), buffers that DDP would broadcast unnoised,
rows that are not examples, and noise placements that leave a rank's data to another rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.privacy import DPSketchState, PrivacyLedger


class Target(nn.Module):
    """loss = <w, t> through a Linear layer without bias: the gradient of w is t."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.layer.weight)

    def forward(self, target: Tensor) -> Tensor:
        return self.layer(target).sum()


class RunningMean(nn.Module):
    """A module this library does not know, with a buffer that follows the data."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


class FoldedTokens(nn.Module):
    """A token-wise Linear applied to ``[B * T, d]``: its rows are tokens, not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.layer(tokens.reshape(-1, tokens.shape[-1]))


def _rank_state(**kwargs) -> DPSketchState:
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, unit="rank")
    options = {"noise_multiplier": 1.0, "min_compression_size": 10**9, **kwargs}
    return DPSketchState(ledger, max_grad_norm=10.0, unit="rank", **options)


def _refusal(action) -> str:
    try:
        action()
    except ValueError as error:
        return str(error)
    return "accepted"


# ---------------------------------------------------------------------------- workers
def participation_worker(rank: int, world: int, steps: int) -> dict:
    """No noise, so the release shows who took part: rank r's update is (r + 1) / 10 per
    coordinate; the decoded sum must be the participants' updates over q W, every step."""
    dim, rate = 64, 0.5
    model = DDP(Target(dim))
    state = _rank_state(sample_rate=rate, noise_multiplier=0.0)
    state.register(model)
    own = torch.full((1, dim), (rank + 1) / 10)
    flags, errors = [], []
    for _ in range(steps):
        model.zero_grad()
        model(own).backward()
        everyone = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(everyone, torch.tensor([float(state.participating)]))
        taking_part = torch.cat(everyone)
        expected = sum(taking_part[r] * (r + 1) / 10 for r in range(world)) / (rate * world)
        errors.append((model.module.layer.weight.grad - expected).abs().max().item())
        flags.append(state.participating)
    return {"flags": flags, "max_error": max(errors), "history": state.ledger.history}


def buffer_worker(rank: int, world: int, broadcast: bool) -> dict:
    """A buffer that follows the data, unknown to the registration checks: refused at the first
    step when DDP would broadcast it, before anything is recorded or released."""
    model = DDP(nn.Sequential(nn.Linear(4, 4), RunningMean(4)), broadcast_buffers=broadcast)
    state = _rank_state()
    state.register(model)
    message = _refusal(lambda: model(torch.randn(8, 4)).sum().backward())
    cleared = all(p.grad is None for p in model.parameters())
    return {"message": message, "cleared": cleared, "steps": state.ledger.steps}


def registration_worker(rank: int, world: int) -> dict:
    """Models and placements refused when registered with the world size known."""
    batch_norm = DDP(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    messages = {
        "broadcast-batch-norm": _refusal(lambda: _rank_state().register(batch_norm)),
        "rank-single": _refusal(
            lambda: _rank_state(noise_placement="single").register(DDP(Target(4)))
        ),
    }
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5)
    example = DPSketchState(
        ledger,
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=1000,
        noise_multiplier=1.0,
        noise_placement="single",
        colluding_ranks=1,
    )
    messages["example-single-colluding"] = _refusal(lambda: example.register(DDP(Target(4))))
    mismatch = DPSketchState(
        PrivacyLedger(accountant="rdp", delta=1e-5, colluding_ranks=0),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=1000,
        noise_multiplier=1.0,
        colluding_ranks=1,
    )
    messages["ledger-colluding"] = _refusal(lambda: mismatch.register(DDP(Target(4))))
    return messages


def folded_worker(rank: int, world: int) -> dict:
    """Tokens folded into the batch inside the model: refused in the forward, nothing recorded
    or released. (Rows folded before the model's input cannot be told from examples: the
    model's input must be one example per row, as the docs state.)"""
    model = DDP(FoldedTokens())
    state = DPSketchState(
        PrivacyLedger(accountant="rdp", delta=1e-5),
        max_grad_norm=1.0,
        unit="example",
        sample_rate=0.01,
        dataset_size=1000,
        noise_multiplier=1.0,
    )
    state.register(model)
    tokens = torch.randn(3, 12, 4)
    message = _refusal(lambda: model(tokens).sum().backward())
    return {"message": message, "steps": state.ledger.steps}


# ---------------------------------------------------------------------------- tests
def test_ranks_sit_out_in_secret_at_the_recorded_rate() -> None:
    """200 steps at q = 0.5: each rank's count is Binomial(200, 0.5) (std 7.1); the bound of
    +-35 is five standard deviations. Independent draws differ somewhere in 200 steps."""
    steps = 200
    results = run_ranks(participation_worker, 2, steps)
    for result in results:
        assert result["max_error"] < 1e-6, result["max_error"]
        assert abs(sum(result["flags"]) - steps / 2) <= 35
        assert result["history"] == [(0.0, 0.5, steps)]
    assert results[0]["flags"] != results[1]["flags"]


def test_a_changing_buffer_is_refused_only_when_broadcast() -> None:
    for result in run_ranks(buffer_worker, 2, True):
        assert "(1.mean)" in result["message"], result["message"]
        assert "broadcast_buffers=False" in result["message"]
        assert result["cleared"] and result["steps"] == 0
    for result in run_ranks(buffer_worker, 2, False):
        assert result["message"] == "accepted" and result["steps"] == 1


def test_refusals_at_registration_name_the_remedy() -> None:
    for messages in run_ranks(registration_worker, 2):
        assert "running_mean" in messages["broadcast-batch-norm"]
        assert "broadcast_buffers=False" in messages["broadcast-batch-norm"]
        assert "single" in messages["rank-single"] and "distributed" in messages["rank-single"]
        assert "distributed" in messages["example-single-colluding"]
        assert "colluding_ranks=0" in messages["ledger-colluding"]


def test_tokens_folded_into_the_batch_are_refused_before_anything_is_recorded() -> None:
    for result in run_ranks(folded_worker, 2):
        assert "reshape(B" in result["message"], result["message"]
        assert result["steps"] == 0
