"""A short seeded DDP training of the digits MLP with one registered hook kind, for tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.demo.digits import accuracy, load_digits, make_mlp, rank_batches
from sketchcomm.hook_kinds import attach_hook
from sketchcomm.hooks import SketchState


def train_digits(
    hook: str = "sketch",
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 32,
    hidden: int = 512,
    seed: int = 0,
    **hook_options: Any,
) -> dict[str, Any]:
    """Train the MLP with DDP in the current process group; returns metrics of this rank.

    ``hook`` is a kind of :mod:`sketchcomm.hook_kinds`, built with ``hook_options``. Plain SGD
    without momentum (momentum, if any, belongs to the sketch hook's state).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_digits()
    # PowerSGD issues collectives from future callbacks: on gloo it needs a single bucket.
    model = DDP(make_mlp(hidden, seed), bucket_cap_mb=1024 if hook == "powersgd" else 25)
    state = attach_hook(model, hook, **hook_options)
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
    dense_bytes = {"allreduce": params * 4, "fp16": params * 2}.get(hook)
    return {
        "hook": hook,
        "test_accuracy": accuracy(model.module, data.x_test, data.y_test),
        "final_loss": loss.item(),
        "parameters": params,
        "bytes_sent_per_step": stats.step_bytes_sent if stats else dense_bytes,
        "bytes_allreduce_per_step": params * 4,
    }
