"""The optimizer choice sets the least ``k``: the choice records it, ``configured`` applies it.

With FetchSGD recovery an optimizer the hook leaves alone gets the recovered top-k update as its
gradient; an adaptive one (anything but SGD) recovers at least ``ADAPTIVE_TOPK_FRACTION`` of each
bucket per step (docs/choosing.md has the measurement). SGD whose momentum is moved into sketch
space recovers at least ``MOMENTUM_TOPK_FRACTION`` (docs/accuracy-frontier.md). Plain SGD and the
optimizer-agnostic recoveries keep the configured ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import nn

from sketchcomm import SketchState
from sketchcomm.config import SketchConfig
from sketchcomm.optimizers import (
    ADAPTIVE_TOPK_FRACTION,
    MOMENTUM_TOPK_FRACTION,
    OptimizerChoice,
    choose,
    configured,
)


def _weights() -> list[nn.Parameter]:
    return list(nn.Linear(8, 4).parameters())


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.Adam])
def test_adaptive_optimizer_recovers_every_coordinate(optimizer_class: type) -> None:
    requested = SketchConfig(compression=10)
    choice = choose(requested, optimizer_class(_weights(), lr=1e-3))
    assert (choice.action, choice.topk_fraction) == ("kept", ADAPTIVE_TOPK_FRACTION)
    assert "every coordinate recovered per step, k = d" in choice.message
    config = configured(choice, requested)
    assert config.kept_coordinates(100_000)[0] == math.ceil(ADAPTIVE_TOPK_FRACTION * 100_000)
    assert requested.kept_coordinates(100_000)[0] == 1000
    # A fraction the user set is kept.
    wide = SketchConfig(compression=10, topk_fraction=0.75)
    chosen = choose(wide, optimizer_class(_weights()), topk_given=True)
    assert configured(chosen, wide).topk_fraction == 0.75


def test_moved_momentum_recovers_every_coordinate() -> None:
    requested = SketchConfig(compression=10)
    moved = choose(requested, torch.optim.SGD(_weights(), lr=0.1, momentum=0.9))
    assert (moved.action, moved.topk_fraction) == ("moved", MOMENTUM_TOPK_FRACTION)
    assert "every coordinate recovered per step, k = d" in moved.message
    assert configured(moved, requested) == SketchConfig(
        compression=10, momentum=0.9, topk_fraction=MOMENTUM_TOPK_FRACTION
    )
    wide = SketchConfig(compression=10, topk_fraction=0.75)
    given = choose(wide, torch.optim.SGD(_weights(), momentum=0.5), topk_given=True)
    assert configured(given, wide) == replace(wide, momentum=0.5)


def test_plain_sgd_and_agnostic_recoveries_keep_the_configured_k() -> None:
    requested = SketchConfig(compression=10)
    plain = choose(requested, torch.optim.SGD(_weights(), lr=0.1))
    assert configured(plain, requested) == requested
    second = SketchConfig(compression=10, second_round=True)
    agnostic = choose(second, torch.optim.AdamW(_weights()))
    assert agnostic.action == "agnostic"
    assert configured(agnostic, second) == second


def test_choice_record_round_trips_and_older_records_load() -> None:
    choice = choose(SketchConfig(compression=10), torch.optim.AdamW(_weights()))
    assert OptimizerChoice(**choice.as_record()) == choice
    older = {k: v for k, v in choice.as_record().items() if k != "topk_fraction"}
    assert OptimizerChoice(**older).topk_fraction == 0.0
    with pytest.raises(ValueError, match="topk_fraction"):
        OptimizerChoice("AdamW", "kept", 0.0, "...", 1.5)


@pytest.mark.parametrize(
    "optimizer", [lambda w: torch.optim.SGD(w, lr=0.1, momentum=0.9), torch.optim.AdamW]
)
def test_a_topk_fraction_the_user_sets_is_kept(optimizer: Callable) -> None:
    given = SketchState(compression=10, topk_fraction=0.01)
    with pytest.warns(UserWarning, match=r"k = 0.01 d .*as configured"):
        given.attach(optimizer(_weights()))
    assert given.config.topk_fraction == 0.01
    default = SketchState(compression=10)
    with pytest.warns(UserWarning, match=r"k = d \(chosen for this optimizer"):
        default.attach(optimizer(_weights()))
    assert default.config.topk_fraction == 1.0
    whole = SketchState(config=SketchConfig(compression=10))
    with pytest.warns(UserWarning, match="as configured"):
        whole.attach(optimizer(_weights()))
    assert whole.config.topk_fraction == 0.01
