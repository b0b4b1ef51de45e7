"""Data-parallel training on the digits data with a choice of DDP communication hook.

Two CPU processes (gloo):

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --hook sketch --compression 20

The same command on a machine with GPUs uses NCCL and one GPU per process (``cuda:LOCAL_RANK``).
``--hook`` picks what DDP sends for each gradient bucket:

* ``allreduce``: the fp32 gradients (DDP's default);
* ``fp16``: the gradients cast to fp16 (half the bytes);
* ``powersgd``: PowerSGD low-rank factors (``--powersgd-rank``);
* ``sketch``: Count Sketch tables ``--compression`` times smaller than the buckets.

With ``--checkpoint PATH`` the model, the optimizer and the hook's state (its error feedback) are
saved every ``--checkpoint-every`` steps and at the end; if ``PATH`` exists the run resumes from it
and continues to ``--steps``. Each step's batches depend only on the seed and the step, so a
resumed run continues exactly as an uninterrupted one would have: the sketch hook's state follows
the parameters, so restoring it on the freshly built model is all it takes (PowerSGD's needs one
extra pass first, see :func:`settle_powersgd_buckets`).

At the end rank 0 prints the test accuracy and the bytes each rank sent in the last step, next to
what a plain allreduce sends.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm import SketchState
from sketchcomm.demo.digits import Digits, accuracy, load_digits, make_mlp, rank_batches
from sketchcomm.hook_kinds import attach_hook, build_hook, hook_kinds

HookState = SketchState | powerSGD_hook.PowerSGDState | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hook",
        # The private kind needs a ledger and per-example clipping: see examples/train_dp.py.
        choices=[kind for kind in hook_kinds() if kind != "private"],
        default="sketch",
        help="what DDP sends for each gradient bucket (default sketch)",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per rank and step")
    parser.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation, the batches and the hashes"
    )
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    parser.add_argument("--checkpoint", help="checkpoint file: resumed from if it exists")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="save every N steps")
    parser.add_argument("--json", help="also write the final figures to this JSON file")

    sketch = parser.add_argument_group("sketch hook")
    sketch.add_argument("--compression", type=float, default=20.0, help="bucket / table size")
    sketch.add_argument("--rows", type=int, help="hash rows (default: 3 for topk, 1 for dense)")
    sketch.add_argument(
        "--recovery",
        choices=("topk", "dense"),
        default="topk",
        help="top-k heavy hitters (default) or the dense median estimate of every coordinate",
    )
    sketch.add_argument(
        "--topk-fraction", type=float, default=0.01, help="coordinates kept per step (topk)"
    )
    sketch.add_argument(
        "--second-round", action="store_true", help="allreduce exact values of the candidates"
    )
    sketch.add_argument("--momentum", type=float, default=0.0, help="momentum in sketch space")

    powersgd = parser.add_argument_group("powersgd hook")
    powersgd.add_argument("--powersgd-rank", type=int, default=1, help="rank of the factors")

    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "hidden", "log_every", "checkpoint_every", "powersgd_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.hook == "sketch":
        try:
            # Every option is checked here, before any process group starts.
            build_hook(args.hook, **hook_options(args))
        except ValueError as error:
            parser.error(f"invalid sketch options: {error}")
    return args


def hook_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of the chosen kind of :mod:`sketchcomm.hook_kinds`."""
    if args.hook == "sketch":
        return {
            "compression": args.compression,
            "rows": args.rows,
            "recovery": args.recovery,
            "topk_fraction": args.topk_fraction,
            "second_round": args.second_round,
            "momentum": args.momentum,
            "seed": args.seed,
        }
    if args.hook == "powersgd":
        return {"rank": args.powersgd_rank, "seed": args.seed}
    return {}


def init_distributed() -> torch.device:
    """Join the process group torchrun describes; NCCL and one GPU per process when possible."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("start this script with torchrun, e.g. torchrun --nproc_per_node=2 ...")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def hook_state_dict(state: HookState) -> dict[str, Any] | None:
    """What a checkpoint keeps of a hook's state (None for the stateless hooks)."""
    if isinstance(state, SketchState):
        return state.state_dict()
    if isinstance(state, powerSGD_hook.PowerSGDState):
        return {name: getattr(state, name) for name in state.__slots__ if name != "process_group"}
    return None


def load_hook_state_dict(state: HookState, saved: dict[str, Any] | None) -> None:
    if isinstance(state, SketchState):
        state.load_state_dict(saved)
    elif isinstance(state, powerSGD_hook.PowerSGDState):
        for name, value in saved.items():
            setattr(state, name, value)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def save_checkpoint(
    path: str,
    step: int,
    args: argparse.Namespace,
    model: DDP,
    optimizer: torch.optim.Optimizer,
    state: HookState,
) -> None:
    """Rank 0 writes one file. The model and optimizer are the same on every rank; the hook state
    is not (error feedback keeps each rank's residual), so every rank's is gathered."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hook_states = [None] * world if rank == 0 else None
    dist.gather_object(to_cpu(hook_state_dict(state)), hook_states, dst=0)
    if rank == 0:
        checkpoint = {
            "step": step,
            "hook": args.hook,
            "world_size": world,
            "model": model.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "hook_states": hook_states,
        }
        torch.save(checkpoint, path + ".tmp")
        os.replace(path + ".tmp", path)  # a crash while saving leaves the last checkpoint intact
    dist.barrier()


def settle_powersgd_buckets(model: DDP, x: torch.Tensor) -> None:
    """A backward pass of zero gradients, to run before a PowerSGD checkpoint is restored.

    DDP's first step after construction puts all gradients into one bucket and rebuilds its
    buckets after it. PowerSGD keeps its state by bucket index and position in the bucket, so its
    saved state must meet the rebuilt buckets it was made for: this pass is that first step, sent
    as a plain allreduce (PowerSGD's first iterations always are), and restoring the checkpoint
    then overwrites what it changed in the state. The sketch hook needs no such pass: its state
    is keyed by parameters and DDP's first bucket is split into the restored ones.
    """
    (model(x).sum() * 0.0).backward()
    model.zero_grad(set_to_none=True)


def load_checkpoint(
    path: str,
    device: torch.device,
    args: argparse.Namespace,
    model: DDP,
    optimizer: torch.optim.Optimizer,
    state: HookState,
) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step."""
    # The hook states hold tuples and numpy generators, hence weights_only=False: load only
    # checkpoints you wrote yourself.
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    if checkpoint["hook"] != args.hook:
        raise SystemExit(f"{path} was written with --hook {checkpoint['hook']}, not {args.hook}")
    if checkpoint["world_size"] != dist.get_world_size():
        raise SystemExit(
            f"{path} was written by {checkpoint['world_size']} processes, not "
            f"{dist.get_world_size()}: every rank's hook state is saved separately"
        )
    model.module.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    load_hook_state_dict(state, checkpoint["hook_states"][dist.get_rank()])
    return checkpoint["step"]


def bytes_per_step(args: argparse.Namespace, model: nn.Module, state: HookState) -> int:
    """Bytes each rank contributed to the collectives of the last step."""
    if isinstance(state, SketchState):
        return state.stats.step_bytes_sent
    element = next(model.parameters()).element_size()
    if isinstance(state, powerSGD_hook.PowerSGDState) and state.iter > state.start_powerSGD_iter:
        # PowerSGD counts the elements it sends in every step after its first, plain ones.
        compressed_steps = state.iter - state.start_powerSGD_iter
        return state.total_numel_after_compression * element // compressed_steps
    numel = sum(p.numel() for p in model.parameters())
    return numel * (2 if args.hook == "fp16" else element)


def report(
    args: argparse.Namespace, model: nn.Module, state: HookState, data: Digits, device: torch.device
) -> None:
    """Print (and with ``--json`` write) the test accuracy and the bytes of the last step."""
    allreduce_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sent = bytes_per_step(args, model, state)
    results = {
        "hook": args.hook,
        "steps": args.steps,
        "world_size": dist.get_world_size(),
        "test_accuracy": accuracy(model, data.x_test.to(device), data.y_test.to(device)),
        "bytes_per_step": sent,
        "allreduce_bytes_per_step": allreduce_bytes,
        "ratio_to_allreduce": sent / allreduce_bytes,
    }
    print(f"test accuracy: {results['test_accuracy']:.4f}")
    print(
        f"bytes sent per step: {sent} (allreduce: {allreduce_bytes}, ratio "
        f"{results['ratio_to_allreduce']:.4f}, {allreduce_bytes / sent:.1f}x fewer)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), **results}, f, indent=2)


def train(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_digits()
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    # PowerSGD issues its later allreduces from future callbacks; with gloo those run on gloo's
    # threads, so two buckets can issue them in different orders on different ranks and hang.
    # One bucket per step (an explicit bucket_cap_mb larger than the model) avoids that.
    single_bucket = args.hook == "powersgd" and device.type == "cpu"
    model = DDP(
        make_mlp(args.hidden, args.seed).to(device), bucket_cap_mb=1024 if single_bucket else None
    )
    # A SketchState binds its per-bucket state to the parameters, so that it survives DDP's
    # bucket rebuild and a restart from a checkpoint.
    state = attach_hook(model, args.hook, **hook_options(args))
    # Plain SGD: the sketch hook keeps its momentum in sketch space (--momentum).
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    batches = rank_batches(len(x_train), args.batch_size, rank, world, args.seed)
    loss_fn = nn.CrossEntropyLoss()

    start = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        if args.hook == "powersgd":
            settle_powersgd_buckets(model, x_train[:1])
        start = load_checkpoint(args.checkpoint, device, args, model, optimizer, state)
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}", flush=True)

    for step in range(start, args.steps):
        index = batches(step).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_train[index]), y_train[index])
        loss.backward()
        optimizer.step()
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            print(f"step {done}/{args.steps} loss {loss.item():.4f}", flush=True)
        if args.checkpoint and (done % args.checkpoint_every == 0 or done == args.steps):
            save_checkpoint(args.checkpoint, done, args, model, optimizer, state)

    if rank == 0:
        report(args, model.module, state, data, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_distributed()
    train(args, device)
    # Objects that training left in reference cycles can hold tensors of the comm hook's
    # futures; freeing them at interpreter shutdown, after the process group is gone, now and
    # then aborts the process with gloo. Collect them while everything is still alive.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
