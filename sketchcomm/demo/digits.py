"""The demo's data and model: real data, seeded, shared by the demo, the examples and the tests.

The data is scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package, no
download), split once into 1,437 training and 360 test images with a fixed seed and standardised
with the training statistics. The model is a two-hidden-layer MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(split_seed: int = 0) -> Digits:
    """The digits data as standardised fp32 tensors ``[n, 64]`` and int64 labels ``[n]``."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    train, test = order[:1437], order[1437:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return Digits(x[train], y[train], x[test], y[test])


def make_mlp(hidden: int = 512, seed: int = 0) -> nn.Sequential:
    """MLP 64 -> hidden -> hidden -> 10 with seeded initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def rank_batches(
    n: int, batch_size: int, rank: int, world: int, seed: int
) -> Callable[[int], torch.Tensor]:
    """Index batches for ``rank``: each step draws a fresh permutation slice (seeded by step), so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        order = torch.randperm(n, generator=g)
        start = rank * batch_size
        return order[start : start + batch_size]

    if batch_size * world > n:
        raise ValueError(f"batch_size * world ({batch_size * world}) exceeds the dataset ({n})")
    return batch
