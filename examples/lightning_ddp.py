"""PyTorch Lightning DDP training of the digits MLP with the sketch hook.

Two CPU processes (gloo), started by torchrun or by Lightning itself:

    torchrun --standalone --nproc_per_node=2 examples/lightning_ddp.py --hook sketch
    python examples/lightning_ddp.py --devices 2 --hook sketch

``--hook allreduce`` trains the same job with DDP's own allreduce, for comparison. On a machine
with GPUs, ``--accelerator gpu`` uses NCCL and one GPU per process.

Why a callback and not ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=sketch_hook)``: Lightning
(checked on 2.6.6) registers ``ddp_comm_hook`` only when the strategy's device is CUDA, and silently
ignores it on the CPU; and it calls ``register_comm_hook`` directly, which leaves the state unbound
to the parameters (see :meth:`sketchcomm.SketchState.register`). :class:`HookCallback` registers
the hook through :func:`sketchcomm.hook_kinds.attach_hook` in ``on_fit_start``, which Lightning
calls after the strategy has wrapped the model in ``DistributedDataParallel`` and before the first
backward pass, on every device type. Pass the strategy no ``ddp_comm_hook`` as well: DDP accepts
one hook.

At the end rank 0 prints the test accuracy and the bytes each rank sent in the last step, next to
what a plain allreduce sends.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from sketchcomm import SketchState
from sketchcomm.demo.digits import accuracy, load_digits, make_mlp
from sketchcomm.hook_kinds import attach_hook, hook_kinds


class DigitsClassifier(L.LightningModule):
    """The digits MLP (64 -> hidden -> hidden -> 10), cross-entropy loss, plain SGD."""

    def __init__(self, hidden: int, lr: float, seed: int) -> None:
        super().__init__()
        self.model = make_mlp(hidden, seed)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Plain SGD: the sketch hook keeps its momentum in sketch space (--momentum).
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class HookCallback(L.Callback):
    """Registers the hook kind ``kind`` (:mod:`sketchcomm.hook_kinds`) with ``options`` on the
    strategy's DDP model; its state is ``self.state`` afterwards (None for allreduce)."""

    def __init__(self, kind: str, **options: Any) -> None:
        self.kind, self.options, self.state = kind, options, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ddp_model = trainer.strategy.model
        if not isinstance(ddp_model, DistributedDataParallel):
            raise TypeError(
                "HookCallback needs a DDP strategy (strategy=DDPStrategy(...)), got a "
                f"{type(ddp_model).__name__} model from {type(trainer.strategy).__name__}"
            )
        self.state = attach_hook(ddp_model, self.kind, **self.options)


def bytes_per_step(kind: str, state: Any, allreduce_bytes: int) -> int:
    """Bytes each process contributed to the collectives of the last step."""
    if isinstance(state, SketchState):
        return state.stats.step_bytes_sent
    if isinstance(state, powerSGD_hook.PowerSGDState) and state.iter > state.start_powerSGD_iter:
        # PowerSGD counts the fp32 elements it sends in every step after its first, plain ones.
        compressed_steps = state.iter - state.start_powerSGD_iter
        return state.total_numel_after_compression * 4 // compressed_steps
    return allreduce_bytes // 2 if kind == "fp16" else allreduce_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hook",
        # The private kind needs a ledger and per-example clipping: see examples/train_dp.py.
        choices=[kind for kind in hook_kinds() if kind != "private"],
        default="sketch",
        help="what DDP sends per gradient bucket (default: Count Sketch tables)",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per process and step")
    parser.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data order, hashes")
    parser.add_argument(
        "--devices",
        type=int,
        default=int(os.environ.get("LOCAL_WORLD_SIZE", 2)),
        help="processes per node (default: torchrun's --nproc_per_node, else 2)",
    )
    parser.add_argument(
        "--accelerator", choices=("cpu", "gpu"), default="cpu", help="gpu: NCCL, one GPU each"
    )
    parser.add_argument("--compression", type=float, default=20.0, help="bucket / table size")
    parser.add_argument(
        "--momentum", type=float, default=0.0, help="momentum in sketch space (sketch hook)"
    )
    parser.add_argument("--json", help="also write the final figures to this JSON file")
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="hide Lightning's progress bar (for logs)"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "hidden", "devices"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)  # also seeds Lightning's DistributedSampler
    data = load_digits()
    train = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    options = {
        "sketch": {"compression": args.compression, "momentum": args.momentum, "seed": args.seed},
        "powersgd": {"seed": args.seed},
    }
    hook = HookCallback(args.hook, **options.get(args.hook, {}))
    # PowerSGD issues collectives from future callbacks: on gloo it needs a single bucket.
    single_bucket = args.hook == "powersgd" and args.accelerator == "cpu"
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=int(os.environ.get("WORLD_SIZE", args.devices)) // args.devices,
        strategy=DDPStrategy(bucket_cap_mb=1024) if single_bucket else DDPStrategy(),
        max_steps=args.steps,
        callbacks=[hook],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
    )
    module = DigitsClassifier(args.hidden, args.lr, args.seed)
    trainer.fit(module, train)

    if trainer.is_global_zero:
        device = module.device
        test_accuracy = accuracy(module.model, data.x_test.to(device), data.y_test.to(device))
        allreduce_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        sent = bytes_per_step(args.hook, hook.state, allreduce_bytes)
        state = hook.state if isinstance(hook.state, SketchState) else None
        results = {
            "hook": args.hook,
            "steps": trainer.global_step,
            "world_size": trainer.world_size,
            "test_accuracy": test_accuracy,
            "bytes_per_step": sent,
            "allreduce_bytes_per_step": allreduce_bytes,
            "sketched_iterations": state.stats.iterations if state is not None else 0,
        }
        print(f"test accuracy: {test_accuracy:.4f}")
        print(f"bytes sent per step: {sent} (allreduce: {allreduce_bytes})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()
