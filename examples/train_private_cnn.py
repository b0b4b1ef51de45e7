"""Private training of a small CNN (Conv2d, GroupNorm, Linear) on scikit-learn's 8x8 digits,
example-level (epsilon, delta)-DP, on two ranks with the private sketch hook.

    torchrun --standalone --nproc_per_node=2 examples/train_private_cnn.py --target-epsilon 8

The 1,797 images (no download: they ship with scikit-learn) are split 1,437 for training and 360
for the test (:func:`sketchcomm.demo.digits.load_digits`, standardised per pixel) and shaped
``[n, 1, 8, 8]``. The network: ``Conv2d(1, c, 3, padding=1)``, ``GroupNorm(4, c)``, ReLU,
``Conv2d(c, 2c, 3, stride=2, padding=1)``, ``GroupNorm(4, 2c)``, ReLU, ``Linear(2c * 16, 10)``
with ``c = --channels``. One image is one example (the privacy unit); the RDP accountant with
Poisson sampling gives the run's epsilon at ``--delta``. ``--mode opacus`` (one process, no
torchrun) and ``--mode allreduce`` are the baselines; see ``examples/private_run.py``.
"""

from __future__ import annotations

import argparse
import sys

import private_run
import torch
from torch import nn
from torch.nn import functional as F

from sketchcomm.demo.digits import load_digits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    private_run.add_arguments(parser, steps=300, batch=64, lr=0.5)
    parser.add_argument("--channels", type=int, default=16, help="channels of the first conv")
    return parser


def make_cnn(channels: int, seed: int) -> nn.Sequential:
    """The seeded CNN ``[B, 1, 8, 8] -> [B, 10]``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.GroupNorm(4, channels),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
        nn.GroupNorm(4, 2 * channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, 10),
    )


def build_task(args: argparse.Namespace) -> private_run.Task:
    if args.tiny:
        args.channels = 4
    data = load_digits(args.seed)
    x_train, x_test = data.x_train.view(-1, 1, 8, 8), data.x_test.view(-1, 1, 8, 8)

    def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B]``: each image's cross-entropy."""
        return F.cross_entropy(model(x), y, reduction="none")

    def metrics(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = model(x_test)
            return {
                "eval_loss": F.cross_entropy(logits, data.y_test).item(),
                "test_accuracy": (logits.argmax(1) == data.y_test).float().mean().item(),
            }

    return private_run.Task(
        lambda: make_cnn(args.channels, args.seed), x_train, data.y_train, example_losses, metrics
    )


if __name__ == "__main__":
    sys.exit(private_run.main(build_parser().parse_args(), build_task))
