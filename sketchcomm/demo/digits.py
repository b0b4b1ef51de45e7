"""A small, seeded DDP training job on real data, shared by the examples, the demo and the tests.

The data is scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package, no
download), split once into 1,437 training and 360 test images with a fixed seed and standardised
with the training statistics. The model is a two-hidden-layer MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.hooks import SketchState

HOOKS = ("allreduce", "fp16", "powersgd", "sketch")


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


def register_hook(ddp_model: DDP, hook: str, **sketch_kwargs: Any) -> object | None:
    """Register one of :data:`HOOKS` on ``ddp_model``; returns its state (None for allreduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "allreduce":
        return None
    if hook == "fp16":
        ddp_model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=sketch_kwargs.get("rank", 1),
            start_powerSGD_iter=2, min_compression_rate=2,
        )  # fmt: skip
        ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    if hook == "sketch":
        state = SketchState(**sketch_kwargs)
        state.register(ddp_model)
        return state
    raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")


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


def train_digits(
    hook: str = "sketch",
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 32,
    hidden: int = 512,
    seed: int = 0,
    **sketch_kwargs: Any,
) -> dict[str, Any]:
    """Train the MLP with DDP in the current process group; returns metrics of this rank.

    Plain SGD without momentum (momentum, if any, belongs to the sketch hook's state).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_digits()
    # PowerSGD issues collectives from future callbacks: on gloo it needs a single bucket.
    model = DDP(make_mlp(hidden, seed), bucket_cap_mb=1024 if hook == "powersgd" else 25)
    state = register_hook(model, hook, **sketch_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = rank_batches(len(data.x_train), batch_size, rank, world, seed)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        index = batches(step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        optimizer.step()
    stats = state.stats if isinstance(state, SketchState) else None
    params = sum(p.numel() for p in model.parameters())
    return {
        "hook": hook,
        "test_accuracy": accuracy(model.module, data.x_test, data.y_test),
        "final_loss": loss.item(),
        "parameters": params,
        "bytes_sent_per_step": stats.step_bytes_sent if stats else _dense_bytes(hook, params),
        "bytes_allreduce_per_step": params * 4,
    }


def _dense_bytes(hook: str, params: int) -> int | None:
    return {"allreduce": params * 4, "fp16": params * 2}.get(hook)
