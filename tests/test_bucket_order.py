"""Buckets whose order is not the canonical one, on real gloo process groups: the sketch hook reads
the canonical vector straight from the bucket buffer and writes its result over the bucket, and
trains to the same parameters, bit for bit, as the computation written out in canonical order
(copy into canonical order, sketch, allreduce, decode, divide by the world size, copy back)."""

import os

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import sketch_compiled
from sketchcomm.buckets import BucketLayout, BucketState
from sketchcomm.demo.digits import load_digits, rank_batches
from sketchcomm.hooks import SketchState, sketch_hook
from sketchcomm.recovery import decode


class Crossed(nn.Module):
    """A 301k-parameter MLP whose layers are registered in the opposite order of their use: DDP's
    rebuilt buckets hold the gradients in the order they become ready (the output layer's
    first), the canonical order is by descending position in the model (the input layer's
    first), so after the rebuild no multi-parameter bucket is in canonical order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.output = nn.Linear(512, 10)
        self.hidden = nn.Linear(512, 512)
        self.input = nn.Linear(64, 512)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(torch.relu(self.hidden(torch.relu(self.input(x)))))


def canonical_reference(states: dict[tuple, BucketState]):
    """A hook computing the sketch hook's step in canonical order with public pieces, keeping
    one bucket state per layout key in ``states``."""

    def hook(state: SketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        world, buffer = dist.get_world_size(), bucket.buffer()
        if state.config.table_shape_for(buffer.numel()) is None:
            dist.all_reduce(buffer)
            result = buffer / world
        else:
            layout = BucketLayout.of(bucket, state.positions)
            if layout.key not in states:
                states[layout.key] = state.new_bucket_state(layout.key, layout.numel, None)
            bucket_state = states[layout.key]
            table = bucket_state.sketch.sketch(layout.to_canonical(buffer))
            dist.all_reduce(table)
            estimate = decode(state.config.decoding, bucket_state, table) / world
            result = layout.from_canonical(estimate)
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        future.set_result(result)
        return future

    return hook


def train(rank: int, world: int, reference: bool, state_kwargs: dict) -> dict:
    data = load_digits()
    batches = rank_batches(len(data.x_train), 32, rank, world, seed=0)
    module = Crossed()
    model = DDP(module)
    state = SketchState(compression=20, start_iter=0, **state_kwargs)
    state.bind(module)
    permuted: list[bool] = []

    def recording_hook(state: SketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        if state.config.table_shape_for(bucket.buffer().numel()) is not None:
            permuted.append(BucketLayout.of(bucket, state.positions).slices is not None)
        return sketch_hook(state, bucket)

    model.register_comm_hook(state, canonical_reference({}) if reference else recording_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(5):
        index = batches(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
    return {
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "permuted": permuted,
    }


def order_worker(rank: int, world: int, state_kwargs: dict, kernels: str) -> dict:
    os.environ[sketch_compiled.ENVIRONMENT_VARIABLE] = kernels
    placed = train(rank, world, False, state_kwargs)
    reference = train(rank, world, True, state_kwargs)
    initial = torch.cat([p.detach().flatten() for p in Crossed().parameters()])
    return {
        "equal": torch.equal(placed["params"], reference["params"]),
        "moved": not torch.equal(placed["params"], initial),
        "permuted": placed["permuted"],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "state_kwargs", "kernels"),
    [
        (3, {"rows": 3, "error_feedback": "sketch", "momentum": 0.9}, "compiled"),
        (2, {"rows": 3, "error_feedback": "sketch", "momentum": 0.9}, "numpy"),
        (2, {"recovery": "dense", "rows": 3}, "compiled"),
    ],
)
def test_bucket_out_of_canonical_order_trains_as_the_canonical_computation(
    world: int, state_kwargs: dict, kernels: str
) -> None:
    """Same parameters on every rank as the canonical-order computation, which trained them,
    while sketched buckets were out of canonical order, before and after DDP's rebuild."""
    for result in run_ranks(order_worker, world, state_kwargs, kernels):
        assert result["equal"] and result["moved"]
        # The one bucket of the first step, and one of the two in each step after the rebuild.
        assert result["permuted"][0] and sum(result["permuted"][1:]) == 4
