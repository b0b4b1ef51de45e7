"""Drop-in defaults with the user's own optimizer.

``SketchState(compression=...)`` with nothing else set learns the optimizer (``attach()`` or, with
the default hook, the optimizer's first ``step()``), moves SGD's momentum into sketch space,
leaves other optimizers alone, says so once, keeps the choice in checkpoints, and trains within a
stated margin of plain allreduce on real gloo ranks (the GPT-2 of the accuracy benchmark).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import SketchState
from sketchcomm.optimizers import (
    ADAPTIVE_TOPK_FRACTION,
    MOMENTUM_TOPK_FRACTION,
    OptimizerChoice,
    choose,
)
from tests.distributed import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 10))


def test_sgd_momentum_is_moved_into_sketch_space_and_told_once() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = SketchState(compression=10)
    with pytest.warns(UserWarning, match="momentum 0.9 moved into sketch space"):
        choice = state.attach(optimizer)
    assert choice.action == "moved"
    assert [g["momentum"] for g in optimizer.param_groups] == [0.0]
    assert state.config.momentum == 0.9 and state.requested.momentum == 0.0
    assert choice.message in state.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert state.attach(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == choice


def test_adamw_is_left_alone_and_agnostic_recovery_moves_nothing() -> None:
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kept = choose(SketchState(compression=10).config, adamw)
    assert (kept.action, kept.momentum) == ("kept", 0.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    agnostic = choose(SketchState(compression=10, second_round=True).config, sgd)
    assert agnostic.action == "agnostic"
    assert sgd.param_groups[0]["momentum"] == 0.9


def test_unmovable_momentum_is_refused_with_the_fix() -> None:
    model = _model()
    nesterov = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov=False"):
        SketchState(compression=10).attach(nesterov)
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    mixed = torch.optim.SGD([{"params": first, "momentum": 0.9}, {"params": second}], lr=0.1)
    with pytest.raises(ValueError, match="one momentum"):
        SketchState(compression=10).attach(mixed)


def test_checkpoint_keeps_the_choice_and_the_strict_check() -> None:
    model = _model()
    state = SketchState(compression=10)
    with pytest.warns(UserWarning):
        state.attach(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    saved = state.state_dict()
    resumed = SketchState(compression=10)  # the options as the user gives them again
    resumed.load_state_dict(saved)
    assert resumed.optimizer_choice == state.optimizer_choice
    assert resumed.config == state.config
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.attach(fresh)
    assert fresh.param_groups[0]["momentum"] == 0.0
    with pytest.raises(ValueError, match="compression"):
        SketchState(compression=20).load_state_dict(saved)
    assert OptimizerChoice(**saved["optimizer"]) == state.optimizer_choice


# ------------------------------------------------------------------ real ranks
STEPS = 100


def _train(rank: int, world: int, optimizer_name: str, seed: int) -> dict:
    """Allreduce, then the default SketchState(compression=50), from the same initialisation and
    on the same batches, as `python -m benchmarks.accuracy --model gpt2` trains them; the
    held-out loss of each and what the hook chose and told."""
    from benchmarks.accuracy import make_optimizer
    from benchmarks.byte_lm import load_byte_text, make_gpt2
    from benchmarks.char_lm import lm_batches, lm_loss

    text = load_byte_text()
    result: dict = {}
    for sketched in (False, True):
        model = make_gpt2(text.vocab_size, seed=seed)
        ddp = DDP(model)
        optimizer = make_optimizer("gpt2", optimizer_name, model.parameters())
        state = SketchState(compression=50) if sketched else None
        if state is not None:
            state.register(ddp)  # the optimizer is seen at its first step
        batches = lm_batches(text.train, 16, 64, seed=seed, rank=rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(STEPS):
                optimizer.zero_grad(set_to_none=True)
                lm_loss(ddp, next(batches)).backward()
                optimizer.step()
        held_out = lm_batches(text.test, 16, 64, seed=seed + 1, rank=0)
        model.eval()
        with torch.no_grad():
            loss = sum(lm_loss(model, next(held_out)).item() for _ in range(8)) / 8
        if state is None:
            result["allreduce"] = loss
            continue
        result.update(
            sketch=loss,
            told=[str(w.message) for w in caught if "sketch_hook" in str(w.message)],
            choice=state.optimizer_choice.action,
            topk_fraction=state.config.topk_fraction,
            optimizer_momentum=optimizer.param_groups[0].get("momentum"),
            ratio=state.stats.compression_ratio,
            world=dist.get_world_size(),
        )
    return result


# Eval loss of the default SketchState(compression=50) over allreduce's (same seed) after 100
# steps of the byte-level GPT-2 on 2 ranks. The margins come from the 3-seed run of `python -m
# benchmarks.accuracy --model gpt2 --steps 100 --seeds 0 1 2 --optimizers sgd adamw --methods
# allreduce default@50 k1@50 k10@50` (docs/accuracy-frontier.md): the default scored SGD 1.096 to
# 1.116 and AdamW 1.158 to 1.160 (seed 0, this test: 1.109 and 1.160); the previous defaults
# (SGD: top 1 % with momentum, 1.143 to 1.221; AdamW: top 10 %, 1.242 to 1.251) fail them.
MARGINS = {"sgd": 1.135, "adamw": 1.19}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_default_trains_near_allreduce_with_the_users_optimizer(optimizer_name: str) -> None:
    results = run_ranks(_train, 2, optimizer_name, 0)
    for result in results:
        assert result["choice"] == ("moved" if optimizer_name == "sgd" else "kept")
        assert len(result["told"]) == 1, result["told"]
        assert result["ratio"] > 45.0
    least_k = MOMENTUM_TOPK_FRACTION if optimizer_name == "sgd" else ADAPTIVE_TOPK_FRACTION
    assert results[0]["topk_fraction"] == least_k
    if optimizer_name == "sgd":
        assert results[0]["optimizer_momentum"] == 0.0
    relative = results[0]["sketch"] / results[0]["allreduce"]
    print(f"{optimizer_name}: sketch / allreduce = {relative:.3f}")
    assert relative < MARGINS[optimizer_name], relative
