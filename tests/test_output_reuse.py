"""The result vector each bucket reuses from step to step, on real gloo process groups: training
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
    """``sketch_hook`` with every bucket's result vector dropped first: each step allocates a new
    one, as recovery did before it reused them."""
    for bucket_state in state.buckets.values():
        bucket_state.output = None
    return sketch_hook(state, bucket)


def train(rank: int, world: int, reuse: bool, state_kwargs: dict, ddp_kwargs: dict) -> dict:
    """Six steps of a 301k-parameter MLP on the digits: two buckets in DDP's default layout, the
    larger past 4 x 65536 elements, where heavy hitters take the sampled-threshold pass."""
    data = load_digits()
    batches = rank_batches(len(data.x_train), 32, rank, world, seed=0)
    model = DDP(make_mlp(hidden=512, seed=0), **ddp_kwargs)
    state = SketchState(compression=20, start_iter=2, **state_kwargs)
    state.register(model, sketch_hook if reuse else fresh_output_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state.attach(optimizer)  # both runs treat the optimizer alike, whichever hook
    pointers: dict[int, set[int]] = {}
    for step in range(6):
        index = batches(step)
        optimizer.zero_grad(set_to_none=not ddp_kwargs)
        nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
        optimizer.step()
        if reuse and step >= 3:  # past the bucket rebuild
            for number, bucket_state in state.buckets.items():
                pointers.setdefault(number, set()).add(bucket_state.output.data_ptr())
    return {
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "buckets": sorted(s.sketch.dim for s in state.buckets.values()),
        "pointers": {number: len(seen) for number, seen in pointers.items()},
    }


def reuse_worker(rank: int, world: int, state_kwargs: dict, ddp_kwargs: dict) -> dict:
    reused = train(rank, world, True, state_kwargs, ddp_kwargs)
    fresh = train(rank, world, False, state_kwargs, ddp_kwargs)
    return {
        "equal": torch.equal(reused["params"], fresh["params"]),
        "buckets": reused["buckets"],
        "pointers": reused["pointers"],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("state_kwargs", "ddp_kwargs"),
    [
        ({"rows": 3, "error_feedback": "sketch", "momentum": 0.9}, {}),
        ({"recovery": "dense", "rows": 3}, {"gradient_as_bucket_view": True}),
    ],
)
def test_reused_result_vector_trains_as_a_fresh_one(state_kwargs: dict, ddp_kwargs: dict) -> None:
    """DDP copies the hook's result into the bucket (or, with ``gradient_as_bucket_view``, the
    gradients) before the bucket's next step, so rewriting one vector per bucket changes nothing:
    the parameters equal those of a run that allocates a new vector every step, on both ranks,
    while each bucket kept one vector over the last three steps."""
    for result in run_ranks(reuse_worker, 2, state_kwargs, ddp_kwargs):
        assert result["equal"]
        assert len(result["buckets"]) == 2 and result["buckets"][1] >= 4 * 65536
        assert set(result["pointers"].values()) == {1}
