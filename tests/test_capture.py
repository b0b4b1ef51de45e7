"""Per-example gradients from output tensor hooks, against autograd one example at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sketchcomm.privacy.capture import PerExampleGradients


def _reference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    rows: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in model.parameters()}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for p in model.parameters():
            rows[p].append(p.grad.flatten().clone())
    return {p: torch.stack(r) for p, r in rows.items()}


def test_linear_layers_match_autograd_and_a_new_forward_starts_afresh() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    capture = PerExampleGradients(model)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    # A first backward whose samples are never consumed (as after a failed step) ...
    nn.functional.cross_entropy(model(x[:4]), y[:4], reduction="sum").backward()
    # ... must not leak into the next one.
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    captured = {p: capture.pop(p) for p in model.parameters()}
    expected = _reference(model, x, y)
    for p in model.parameters():
        torch.testing.assert_close(captured[p], expected[p], rtol=1e-5, atol=1e-6)


def test_token_dimension_is_summed_per_example() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(4, 2)
    capture = PerExampleGradients(layer)
    x = torch.randn(3, 5, 4)  # [batch, tokens, features]
    layer(x).pow(2).sum().backward()
    weight = capture.pop(layer.weight)
    for b in range(3):
        layer.zero_grad()
        layer(x[b : b + 1]).pow(2).sum().backward()
        torch.testing.assert_close(weight[b], layer.weight.grad.flatten(), rtol=1e-5, atol=1e-6)


def test_evaluation_forward_captures_nothing() -> None:
    layer = nn.Linear(3, 1)
    capture = PerExampleGradients(layer)
    with torch.no_grad():
        layer(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        capture.pop(layer.weight)


def test_frozen_unsupported_layers_are_accepted() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    PerExampleGradients(model)
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="LayerNorm"):
        PerExampleGradients(model)
