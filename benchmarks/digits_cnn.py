"""Image classification with a small CNN on scikit-learn's 8x8 digits, available offline.

The images are :func:`sketchcomm.demo.digits.load_digits` (1,437 training and 360 test images,
standardised per pixel) shaped ``[n, 1, 8, 8]``. The network (151,306 parameters, seeded
initialisation):

    Conv2d(1, 32, 3, padding=1), ReLU, Conv2d(32, 64, 3, stride=2, padding=1), ReLU,
    Flatten, Linear(64 * 4 * 4, 128), ReLU, Linear(128, 10)

Training batches are drawn at random per rank (each rank its own generator), the loss is the
mean cross-entropy, and the held-out loss is over the whole test split.

>>> images = load_digit_images()
>>> tuple(images.x_train.shape), tuple(images.x_test.shape)
((1437, 1, 8, 8), (360, 1, 8, 8))
>>> model = make_digits_cnn(seed=0)
>>> sum(p.numel() for p in model.parameters())
151306
>>> x, y = next(image_batches(images.x_train, images.y_train, 4, seed=0, rank=1))
>>> tuple(x.shape), tuple(y.shape), image_loss(model, (x, y)).shape
((4, 1, 8, 8), (4,), torch.Size([]))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sketchcomm.demo.digits import load_digits

__all__ = ["DigitImages", "image_batches", "image_loss", "load_digit_images", "make_digits_cnn"]


@dataclass
class DigitImages:
    """Standardised digits as ``[n, 1, 8, 8]`` fp32 images and ``[n]`` int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digit_images(split_seed: int = 0) -> DigitImages:
    """The digits of :func:`sketchcomm.demo.digits.load_digits` as one-channel images."""
    data = load_digits(split_seed)
    return DigitImages(
        data.x_train.view(-1, 1, 8, 8), data.y_train, data.x_test.view(-1, 1, 8, 8), data.y_test
    )


def make_digits_cnn(seed: int = 0, channels: int = 32, hidden: int = 128) -> nn.Sequential:
    """The CNN above (``channels`` and ``2 channels`` feature maps, ``hidden`` units)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def image_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int, rank: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of ``batch_size`` images drawn with replacement, from a generator of
    ``seed`` and ``rank`` (ranks see different images; a run is reproducible)."""
    if not 0 < batch_size <= len(x):
        raise ValueError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    while True:
        picks = torch.randint(0, len(x), (batch_size,), generator=generator)
        yield x[picks], y[picks]


def image_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``batch`` ``(images [B, 1, 8, 8], labels [B])``."""
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)
