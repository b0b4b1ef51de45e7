"""Does the sketch hook train like allreduce with the optimizer the user already has?

``python -m benchmarks.accuracy`` trains the seeded character Llama of
:mod:`benchmarks.char_lm` (2 layers, 128 wide, 322k parameters) on 2 gloo ranks
with each optimizer (``sgd``: SGD with momentum 0.9; ``adamw``: AdamW) and each method, from the
same initialisation and on the same batches per seed, and reports the held-out loss relative to
allreduce's run of the same seed and optimizer (mean and spread over the seeds).

A method is ``allreduce`` or ``NAME@RATIO`` with ``NAME`` one of :data:`METHODS` (sketch options
on top of ``compression=RATIO``). ``default`` is ``SketchState(compression=RATIO)`` with nothing
else set, registered with ``state.register(ddp)``, so that the hook sees the optimizer at its
first step (SGD's momentum is moved into sketch space); ``unmoved`` is the same state registered
with ``ddp.register_comm_hook``, which leaves the optimizer's momentum where it is (the behaviour
before the hook learned the optimizer). The optimizer is always the user's.

Every rank runs every (seed, optimizer, method) in turn in one process group, so the cost of
starting processes is paid once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.char_lm import LMShape, lm_batches, lm_loss, load_char_text, make_lm
from sketchcomm.hooks import SketchState, sketch_hook

__all__ = ["ACCURACY_LM", "METHODS", "Run", "compare", "main", "summarise"]

#: The model (322k parameters; DDP's small first bucket and the rest). At 100x its smaller
#: buckets have ``c < sqrt(d)`` and are allreduced: the achieved ratio is reported.
ACCURACY_LM = LMShape(
    hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, max_positions=256
)

#: Sketch options of each method, on top of ``compression``.
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "unmoved": {},
    "second-round": {"second_round": True},
    "dense": {"recovery": "dense"},
}

#: Learning rates of each optimizer (tuned for allreduce on this model).
LEARNING_RATES = {"sgd": 0.15, "adamw": 3e-3}


@dataclass(frozen=True)
class Run:
    """One training run: what every rank trains."""

    seed: int
    optimizer: str
    method: str
    steps: int
    batch_size: int = 16
    seq_len: int = 64
    eval_batches: int = 8


def make_optimizer(name: str, parameters: Any) -> torch.optim.Optimizer:
    """The user's optimizer: SGD with momentum 0.9 or AdamW (weight decay 0.01)."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=LEARNING_RATES["sgd"], momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=LEARNING_RATES["adamw"], weight_decay=0.01)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def sketch_options(method: str) -> dict[str, Any] | None:
    """``SketchState`` options of ``method`` (``None`` for allreduce)."""
    if method == "allreduce":
        return None
    name, _, ratio = method.partition("@")
    if name not in METHODS or not ratio:
        raise ValueError(
            f"method must be 'allreduce' or NAME@RATIO with NAME in {tuple(METHODS)}, "
            f"got {method!r}"
        )
    return {"compression": float(ratio), **METHODS[name]}


def train_one(run: Run, text: Any) -> dict[str, Any]:
    """Train ``run`` in the current process group; the held-out loss and the bytes sent."""
    rank = dist.get_rank()
    model = make_lm(text.vocab_size, ACCURACY_LM, seed=run.seed)
    ddp = DDP(model, broadcast_buffers=False)
    optimizer = make_optimizer(run.optimizer, model.parameters())
    options = sketch_options(run.method)
    state = None
    if options is not None:
        state = SketchState(**options)
        if run.method.startswith("unmoved@"):
            ddp.register_comm_hook(state, sketch_hook)
        else:
            state.register(ddp)
    batches = lm_batches(text.train, run.batch_size, run.seq_len, seed=run.seed, rank=rank)
    for _ in range(run.steps):
        optimizer.zero_grad(set_to_none=True)
        lm_loss(ddp, next(batches)).backward()
        optimizer.step()
    held_out = lm_batches(text.test, run.batch_size, run.seq_len, seed=run.seed + 1, rank=0)
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, next(held_out)).item() for _ in range(run.eval_batches)]
    ratio = 1.0 if state is None else state.stats.compression_ratio
    return {
        **asdict(run),
        "eval_loss": sum(losses) / len(losses),
        "ratio": ratio,
        "chose": None if state is None else state.describe(),
    }


def _rank_entry(rank: int, world: int, store: str, runs: list[Run], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        text = load_char_text()
        results = [train_one(run, text) for run in runs]
        if rank == 0:
            with open(out, "w") as file:
                json.dump(results, file)
    finally:
        dist.destroy_process_group()


def compare(runs: Sequence[Run], world_size: int = 2) -> list[dict[str, Any]]:
    """Every run on ``world_size`` gloo ranks of this machine; rank 0's results in run order."""
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.json")
        mp.start_processes(
            _rank_entry,
            (world_size, store, list(runs), out),
            nprocs=world_size,
            start_method="spawn",
        )
        with open(out) as file:
            return json.load(file)


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (optimizer, method): eval loss over allreduce's of the same seed, mean and spread
    (half the range over the seeds), and the mean achieved compression ratio."""
    reference = {
        (r["seed"], r["optimizer"]): r["eval_loss"] for r in results if r["method"] == "allreduce"
    }
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["optimizer"], r["method"]), []).append(r)
    rows = []
    for (optimizer, method), group in groups.items():
        relative = [r["eval_loss"] / reference[(r["seed"], optimizer)] for r in group]
        rows.append(
            {
                "optimizer": optimizer,
                "method": method,
                "seeds": len(group),
                "eval_loss": statistics.fmean(r["eval_loss"] for r in group),
                "relative": statistics.fmean(relative),
                "spread": (max(relative) - min(relative)) / 2,
                "ratio": statistics.fmean(r["ratio"] for r in group),
            }
        )
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| optimizer | method | achieved ratio | eval loss | vs allreduce (mean ± half range) "
        "| seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['method']} | {r['ratio']:.1f}x | {r['eval_loss']:.3f} | "
            f"{r['relative']:.3f} ± {r['spread']:.3f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"])
    parser.add_argument(
        "--methods", nargs="+", default=["allreduce", "default@10", "default@50", "default@100"]
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", help="write every run's result here")
    args = parser.parse_args(argv)
    methods = list(args.methods)
    if "allreduce" not in methods:
        methods.insert(0, "allreduce")
    for method in methods:
        sketch_options(method)
    runs = [
        Run(seed, optimizer, method, args.steps)
        for seed in args.seeds
        for optimizer in args.optimizers
        for method in methods
    ]
    results = compare(runs)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    print(markdown(summarise(results)))
    for r in results:
        if r["chose"] and r["seed"] == args.seeds[0]:
            print(f"{r['optimizer']} {r['method']}: {r['chose']}")
    return 0 if all(math.isfinite(r["eval_loss"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
