"""An adaptive optimizer gets a larger ``k``: the choice records it, ``configured`` applies it.

With FetchSGD recovery an optimizer the hook leaves alone gets the recovered top-k update as its
gradient; an adaptive one (anything but SGD) recovers at least ``ADAPTIVE_TOPK_FRACTION`` of each
bucket per step (docs/choosing.md has the measurement). SGD, with or without momentum, and the
optimizer-agnostic recoveries keep the configured ``k``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sketchcomm.config import SketchConfig
from sketchcomm.optimizers import (
    ADAPTIVE_TOPK_FRACTION,
    OptimizerChoice,
    choose,
    configured,
)


def _weights() -> list[nn.Parameter]:
    return list(nn.Linear(8, 4).parameters())


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.Adam])
def test_adaptive_optimizer_recovers_a_tenth_of_each_bucket(optimizer_class: type) -> None:
    requested = SketchConfig(compression=10)
    choice = choose(requested, optimizer_class(_weights(), lr=1e-3))
    assert (choice.action, choice.topk_fraction) == ("kept", ADAPTIVE_TOPK_FRACTION)
    assert f"k = {ADAPTIVE_TOPK_FRACTION:g} d" in choice.message
    config = configured(choice, requested)
    assert config.kept_coordinates(100_000)[0] == math.ceil(ADAPTIVE_TOPK_FRACTION * 100_000)
    assert requested.kept_coordinates(100_000)[0] == 1000
    # A larger fraction the user asked for is kept.
    wide = SketchConfig(compression=10, topk_fraction=0.25)
    assert configured(choose(wide, optimizer_class(_weights())), wide).topk_fraction == 0.25


def test_sgd_and_agnostic_recoveries_keep_the_configured_k() -> None:
    requested = SketchConfig(compression=10)
    moved = choose(requested, torch.optim.SGD(_weights(), lr=0.1, momentum=0.9))
    assert (moved.action, moved.topk_fraction) == ("moved", 0.0)
    assert configured(moved, requested) == SketchConfig(compression=10, momentum=0.9)
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
