"""The training loop shared by ``train_private_lm.py`` and ``train_private_cnn.py``: one task
(a model, its data and its per-example loss) trained in one of three ways.

* ``private`` — DDP on every rank of the ``torchrun`` job, with the private sketch hook
  (:class:`~sketchcomm.privacy.DPSketchState`, ``unit="example"``): each rank draws its own Poisson
  batch (:func:`~sketchcomm.demo.private_training.poisson_batches`), the loss is the *sum* of the
  per-example losses, and the hook clips each example's gradient in sketch space, adds the noise
  calibrated for ``(target_epsilon, delta)`` over ``steps`` at ``q`` (:func:`poisson_rate`, RDP
  accountant) and divides the released sum by ``q N``. Momentum lives in the hook (sketch space),
  and applies to sketched buckets only: a bucket below ``--min-compression-size`` is privatised as
  an exact table and read back without it (plain SGD).
* ``opacus`` — Opacus DP-SGD in one process: ``PrivacyEngine.make_private`` with Poisson sampling at
  the same ``q``, the same noise multiplier, clipping norm and steps, mean loss (Opacus divides the
  noisy sum by the expected batch ``q N``, as the hook does), SGD with the same momentum.
* ``allreduce`` — DDP's own allreduce, no privacy, the same Poisson batches and update
  ``sum / (q N)``, whose norm is clipped to ``max_grad_norm`` (``clip_grad_norm_``, as ordinary
  training loops do; without it SGD at the private runs' learning rate diverges on GPT-2).

Every mode builds the model from the same seed and reads the same data; rank 0 prints one line
``RESULT {json}`` at the end (eval loss before and after, the task's metric, epsilon, bytes per step
and rank, the median step time), and writes it to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.config import SketchConfig
from sketchcomm.demo.private_training import poisson_batches
from sketchcomm.privacy import DPSketchState, PrivacyLedger
from sketchcomm.privacy.calibration import calibrate_noise_multiplier

MODES = ("private", "opacus", "allreduce")
ACCOUNTANT = "rdp"
WARMUP_STEPS = 2  # steps left out of the median step time


@dataclass
class Task:
    """What a mode trains: ``build_model()`` (seeded, same init every call), training examples
    ``x_train [N, ...]``, ``y_train [N, ...]``, held-out ``x_eval``, ``y_eval``,
    ``example_losses(model, x, y) -> [B]`` (one loss per example) and
    ``metrics(model) -> dict`` on the held-out set (must include ``eval_loss``)."""

    build_model: Callable[[], nn.Module]
    x_train: torch.Tensor
    y_train: torch.Tensor
    example_losses: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: Callable[[nn.Module], dict[str, float]]


def add_arguments(parser: argparse.ArgumentParser, *, steps: int, batch: int, lr: float) -> None:
    """The options every task shares."""
    add = parser.add_argument
    add("--mode", choices=MODES, default="private", help="how to train (see the module's doc)")
    add("--steps", type=int, default=steps, help="optimizer steps")
    add(
        "--batch-size",
        type=int,
        default=batch,
        help="expected global batch; q = 1 / ceil(N / batch)",
    )
    add("--target-epsilon", type=float, default=8.0, help="epsilon of the whole run")
    add("--delta", type=float, default=1e-5, help="delta (below 1/N)")
    add("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    add("--lr", type=float, default=lr, help="SGD learning rate")
    add("--momentum", type=float, default=0.9, help="momentum (in sketch space for private)")
    add("--compression", type=float, default=20.0, help="bucket elements per table element")
    add("--topk-fraction", type=float, default=0.1, help="coordinates recovered per step")
    add(
        "--min-compression-size",
        type=int,
        default=SketchConfig.min_compression_size,
        help="buckets with fewer elements are privatised uncompressed (an exact table)",
    )
    add("--seed", type=int, default=0, help="seed of the model, the data split and the hashes")
    add(
        "--sampling-seed",
        type=int,
        default=None,
        help="seed of the Poisson sampling (reproducible runs; secret for the guarantee to hold); "
        "by default drawn from the operating system",
    )
    add("--tiny", action="store_true", help="a tiny model and data (tests)")
    add("--json", type=Path, default=None, help="write the result here (rank 0)")


def poisson_rate(n: int, batch_size: int) -> float:
    """``q = 1 / ceil(N / batch)``: the rate that Opacus's ``make_private(poisson_sampling=True)``
    gives a ``DataLoader(batch_size=batch)`` (one over its length), used by every mode so that the
    three sample alike and account alike."""
    return 1.0 / math.ceil(n / batch_size)


def _median_step_time(times: list[float]) -> float:
    timed = times[WARMUP_STEPS:] or times
    return statistics.median(timed) if timed else float("nan")


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _distributed_run(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(task.x_train)
    sample_rate = poisson_rate(n, args.batch_size)
    model = task.build_model()
    initial = task.metrics(model)
    ddp_model = DDP(model)
    state = None
    if args.mode == "private":
        ledger = PrivacyLedger(
            accountant=ACCOUNTANT,
            delta=args.delta,
            budget=args.target_epsilon,
            writer=False,
            dataset_size=n,
        )
        state = DPSketchState(
            ledger,
            max_grad_norm=args.max_grad_norm,
            unit="example",
            sample_rate=sample_rate,
            dataset_size=n,
            target_epsilon=args.target_epsilon,
            steps=args.steps,
            compression=args.compression,
            min_compression_size=args.min_compression_size,
            topk_fraction=args.topk_fraction,
            momentum=args.momentum,
            seed=args.seed,
        )
        state.register(ddp_model)
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr, momentum=args.momentum)
    batches = poisson_batches(
        n, sample_rate, rank, world, args.seed, args.steps, args.sampling_seed
    )
    times = []
    for index in batches:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.example_losses(ddp_model, task.x_train[index], task.y_train[index]).sum()
        if state is None:  # DDP averages over ranks: world * sum / (q N) is the global sum / (q N)
            loss = loss * (world / (sample_rate * n))
        loss.backward()
        if state is None:  # the plain run clips the batch's gradient norm, as LM training does
            nn.utils.clip_grad_norm_(ddp_model.parameters(), args.max_grad_norm)
        optimizer.step()
        times.append(time.perf_counter() - start)
    numel = sum(p.numel() for p in model.parameters())
    result = {
        "mode": args.mode,
        "world": world,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "dataset_size": n,
        "parameters": numel,
        "initial_eval_loss": initial["eval_loss"],
        **task.metrics(model),
        "step_time_s": _median_step_time(times),
        "bytes_per_step": state.stats.step_bytes_sent if state else numel * 4,
    }
    if state is not None:
        result |= {
            "epsilon": ledger.epsilon,
            "delta": args.delta,
            "noise_multiplier": state.noise_multiplier,
            "ledger_history": ledger.history,
            "compression_ratio": state.stats.compression_ratio,
        }
    else:
        result |= {"epsilon": None, "delta": None}  # not private
    return result


def _opacus_run(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    n = len(task.x_train)
    sample_rate = poisson_rate(n, args.batch_size)
    sigma = calibrate_noise_multiplier(
        args.target_epsilon, args.delta, sample_rate, steps=args.steps, accountant=ACCOUNTANT
    )
    model = task.build_model()  # Opacus wraps it: its parameters are the ones trained
    initial = task.metrics(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=args.batch_size)
    engine = PrivacyEngine(accountant=ACCOUNTANT, secure_mode=False)
    generator = (
        None if args.sampling_seed is None else torch.Generator().manual_seed(args.sampling_seed)
    )
    private_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=args.max_grad_norm,
        poisson_sampling=True,
        loss_reduction="mean",
        noise_generator=generator,
    )
    times: list[float] = []
    while len(times) < args.steps:
        for x, y in loader:
            if len(times) == args.steps:
                break
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            task.example_losses(private_model, x, y).mean().backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return {
        "mode": "opacus",
        "world": 1,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "dataset_size": n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial_eval_loss": initial["eval_loss"],
        **task.metrics(model),
        "step_time_s": _median_step_time(times),
        "bytes_per_step": 0,
        "epsilon": engine.get_epsilon(args.delta),
        "delta": args.delta,
        "noise_multiplier": sigma,
        "accountant_history": engine.accountant.history,
    }


def main(args: argparse.Namespace, task_for: Callable[[argparse.Namespace], Task]) -> int:
    """Train ``task_for(args)`` in ``args.mode``; ``opacus`` runs in this one process, the others
    under ``torchrun`` (gloo on CPU)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    task = task_for(args)
    if args.mode == "opacus":
        _report(args, _opacus_run(args, task))
        return 0
    dist.init_process_group("gloo")
    try:
        result = _distributed_run(args, task)
        if dist.get_rank() == 0:
            _report(args, result)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0
