"""The sketch hook writes its result over the bucket buffer, on real gloo process groups: training
with it gives the same parameters, bit for bit, as training with a fresh vector every step."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.demo.digits import load_digits, make_mlp, rank_batches
from sketchcomm.hooks import SketchState, sketch_hook


def fresh_output_hook(
    state: SketchState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """``sketch_hook`` with its result copied into a new vector, the bucket buffer left as DDP
    filled it."""
    gradients = bucket.buffer().clone()

    def fresh(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        result = future.value().clone()
        bucket.buffer().copy_(gradients)
        return result

    return sketch_hook(state, bucket).then(fresh)


def train(rank: int, world: int, reuse: bool, state_kwargs: dict, ddp_kwargs: dict) -> dict:
    """Six steps of a 301k-parameter MLP on the digits: two buckets in DDP's default layout, the
    larger past 4 x 65536 elements, where heavy hitters take the sampled-threshold pass."""
    data = load_digits()
    batches = rank_batches(len(data.x_train), 32, rank, world, seed=0)
    model = DDP(make_mlp(hidden=512, seed=0), **ddp_kwargs)
    state = SketchState(compression=20, start_iter=2, **state_kwargs)
    in_place: list[bool] = []

    def in_place_hook(
        state: SketchState, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        buffer, sketched = bucket.buffer(), state.iter >= state.config.start_iter

        def check(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            if sketched:
                in_place.append(future.value().data_ptr() == buffer.data_ptr())
            return future.value()

        return sketch_hook(state, bucket).then(check)

    state.register(model, in_place_hook if reuse else fresh_output_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state.attach(optimizer)  # both runs treat the optimizer alike, whichever hook
    for step in range(6):
        index = batches(step)
        optimizer.zero_grad(set_to_none=not ddp_kwargs)
        nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
    return {
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "buckets": sorted(s.sketch.dim for s in state.buckets.values()),
        "in_place": in_place,
    }


def reuse_worker(rank: int, world: int, state_kwargs: dict, ddp_kwargs: dict) -> dict:
    reused = train(rank, world, True, state_kwargs, ddp_kwargs)
    fresh = train(rank, world, False, state_kwargs, ddp_kwargs)
    return {
        "equal": torch.equal(reused["params"], fresh["params"]),
        "buckets": reused["buckets"],
        "in_place": reused["in_place"],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("state_kwargs", "ddp_kwargs"),
    [
        ({"rows": 3, "error_feedback": "sketch", "momentum": 0.9}, {}),
        ({"recovery": "dense", "rows": 3}, {"gradient_as_bucket_view": True}),
    ],
)
def test_result_over_the_bucket_trains_as_a_fresh_one(state_kwargs: dict, ddp_kwargs: dict) -> None:
    """DDP copies the hook's result into the gradients (with ``gradient_as_bucket_view`` they
    are the bucket) before the bucket's next step, so writing the result over the bucket buffer
    changes nothing: the parameters equal those of a run whose hook returns a new vector and
    leaves the bucket as it was, on both ranks, while every sketched result of the first run was
    the bucket buffer itself."""
    for result in run_ranks(reuse_worker, 2, state_kwargs, ddp_kwargs):
        assert result["equal"]
        assert len(result["buckets"]) == 2 and result["buckets"][1] >= 4 * 65536
        assert len(result["in_place"]) == 8 and all(result["in_place"])
