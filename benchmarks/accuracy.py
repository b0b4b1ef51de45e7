"""Does the sketch hook train like allreduce with the optimizer the user already has?

``python -m benchmarks.accuracy`` trains a seeded model on 2 gloo ranks with each
optimizer (``sgd``: SGD with momentum 0.9; ``adamw``: AdamW) and each method, from the same
initialisation and on the same batches per seed, and reports the held-out loss relative to
allreduce's run of the same seed and optimizer (mean and spread over the seeds) and the bytes
each method sends per step. The model (``--model``) is ``char``, the character Llama of
:mod:`benchmarks.char_lm` (2 layers, 128 wide, 322k parameters), or ``gpt2``, the byte-level
GPT-2 of :mod:`benchmarks.byte_lm` (2 layers, 128 wide, 462k parameters), or ``cnn``, the
digits CNN of :mod:`benchmarks.digits_cnn` (151k parameters; batches of ``batch_size`` images, the
held-out loss over the whole test split).

The methods (allreduce, fp16, PowerSGD and the sketch hook's variants) and how their bytes are
counted are in :mod:`benchmarks.accuracy_methods`; the frontier table and plot in
:mod:`benchmarks.accuracy_frontier`. The optimizer is always the user's.

Every rank runs every (seed, optimizer, method) in turn in one process group, so the cost of
starting processes is paid once; with ``--progress`` rank 0 appends each run's result to a JSON
lines file as soon as it ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.accuracy_methods import check_method, register_method
from benchmarks.byte_lm import load_byte_text, make_gpt2
from benchmarks.char_lm import LMShape, lm_batches, lm_loss, load_char_text, make_lm
from benchmarks.digits_cnn import image_batches, image_loss, load_digit_images, make_digits_cnn

__all__ = ["ACCURACY_LM", "LEARNING_RATES", "Run", "compare", "main", "summarise"]

#: The character model (322k parameters; DDP's small first bucket and the rest). At 100x its
#: smaller buckets have ``c < sqrt(d)`` and are allreduced: the achieved ratio is reported.
ACCURACY_LM = LMShape(
    hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, max_positions=256
)

#: Learning rates of each (model, optimizer) (tuned for allreduce on the model).
LEARNING_RATES = {
    ("char", "sgd"): 0.15,
    ("char", "adamw"): 3e-3,
    ("gpt2", "sgd"): 0.05,
    ("gpt2", "adamw"): 1e-3,
    ("cnn", "sgd"): 0.05,
    ("cnn", "adamw"): 3e-3,
}
MODELS = ("char", "gpt2", "cnn")


@dataclass(frozen=True)
class Run:
    """One training run: what every rank trains."""

    seed: int
    optimizer: str
    method: str
    steps: int
    model: str = "char"
    batch_size: int = 16
    seq_len: int = 64
    eval_batches: int = 8


def make_optimizer(model: str, name: str, parameters: Any) -> torch.optim.Optimizer:
    """The user's optimizer: SGD with momentum 0.9 or AdamW (weight decay 0.01)."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=LEARNING_RATES[(model, name)], momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=LEARNING_RATES[(model, name)], weight_decay=0.01)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def build_model(run: Run, data: Any) -> nn.Module:
    """``run``'s model with the seed's initialisation."""
    if run.model == "gpt2":
        return make_gpt2(data.vocab_size, seed=run.seed)
    if run.model == "char":
        return make_lm(data.vocab_size, ACCURACY_LM, seed=run.seed)
    if run.model == "cnn":
        return make_digits_cnn(seed=run.seed)
    raise ValueError(f"model must be one of {MODELS}, got {run.model!r}")


def load_data(model: str) -> Any:
    """What ``model`` trains on: bytes for ``gpt2``, characters for ``char``, images for ``cnn``."""
    if model == "cnn":
        return load_digit_images()
    return load_byte_text() if model == "gpt2" else load_char_text()


def train_batches(run: Run, data: Any, rank: int) -> Iterator[Any]:
    """``rank``'s training batches of ``run``."""
    if run.model == "cnn":
        return image_batches(data.x_train, data.y_train, run.batch_size, seed=run.seed, rank=rank)
    return lm_batches(data.train, run.batch_size, run.seq_len, seed=run.seed, rank=rank)


def held_out_loss(run: Run, model: nn.Module, data: Any) -> float:
    """The eval loss: ``eval_batches`` held-out windows of text, or the whole test split."""
    model.eval()
    with torch.no_grad():
        if run.model == "cnn":
            return image_loss(model, (data.x_test, data.y_test)).item()
        held_out = lm_batches(data.test, run.batch_size, run.seq_len, seed=run.seed + 1, rank=0)
        losses = [lm_loss(model, next(held_out)).item() for _ in range(run.eval_batches)]
    return sum(losses) / len(losses)


def train_one(run: Run, data: Any) -> dict[str, Any]:
    """Train ``run`` in the current process group; the held-out loss and the bytes sent."""
    rank = dist.get_rank()
    start = time.perf_counter()
    model = build_model(run, data)
    ddp = DDP(model)
    optimizer = make_optimizer(run.model, run.optimizer, model.parameters())
    method = register_method(run.method, ddp, run.steps)
    batches = train_batches(run, data, rank)
    loss = image_loss if run.model == "cnn" else lm_loss
    for _ in range(run.steps):
        optimizer.zero_grad(set_to_none=True)
        loss(ddp, next(batches)).backward()
        optimizer.step()
        method.end_step()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        **asdict(run),
        "eval_loss": held_out_loss(run, model, data),
        "step_bytes": method.step_bytes,
        "mean_step_bytes": method.total_bytes / max(run.steps, 1),
        "ratio": dense_bytes / method.step_bytes if method.step_bytes else 1.0,
        "chose": method.describe(),
        "seconds": time.perf_counter() - start,
    }


def _rank_entry(
    rank: int, world: int, store: str, runs: list[Run], out: str, progress: str | None
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = {model: load_data(model) for model in sorted({run.model for run in runs})}
        results = []
        for run in runs:
            results.append(train_one(run, data[run.model]))
            if rank == 0 and progress:
                with open(progress, "a") as file:
                    file.write(json.dumps(results[-1]) + "\n")
        if rank == 0:
            with open(out, "w") as file:
                json.dump(results, file)
    finally:
        dist.destroy_process_group()


def compare(
    runs: Sequence[Run], world_size: int = 2, progress: str | None = None
) -> list[dict[str, Any]]:
    """Every run on ``world_size`` gloo ranks of this machine; rank 0's results in run order."""
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.json")
        mp.start_processes(
            _rank_entry,
            (world_size, store, list(runs), out, progress),
            nprocs=world_size,
            start_method="spawn",
        )
        with open(out) as file:
            return json.load(file)


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, optimizer, method): eval loss over allreduce's of the same seed, mean and
    spread (half the range over the seeds), the mean achieved compression ratio and bytes per
    step (the last step's), for the seeds that have an allreduce run."""
    reference = {
        (r.get("model", "char"), r["seed"], r["optimizer"]): r["eval_loss"]
        for r in results
        if r["method"] == "allreduce"
    }
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        key = (r.get("model", "char"), r["optimizer"], r["method"])
        if (key[0], r["seed"], key[1]) in reference:
            groups.setdefault(key, []).append(r)
    rows = []
    for (model, optimizer, method), group in groups.items():
        relative = [r["eval_loss"] / reference[(model, r["seed"], optimizer)] for r in group]
        rows.append(
            {
                "model": model,
                "optimizer": optimizer,
                "method": method,
                "seeds": len(group),
                "eval_loss": statistics.fmean(r["eval_loss"] for r in group),
                "loss_spread": (
                    max(r["eval_loss"] for r in group) - min(r["eval_loss"] for r in group)
                )
                / 2,
                "relative": statistics.fmean(relative),
                "spread": (max(relative) - min(relative)) / 2,
                "ratio": statistics.fmean(r["ratio"] for r in group),
                "step_bytes": statistics.fmean(r.get("step_bytes", 0) for r in group),
            }
        )
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| model | optimizer | method | bytes per step | achieved ratio | eval loss "
        "(mean ± half range) | vs allreduce (mean ± half range) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['method']} | {r['step_bytes']:,.0f} | "
            f"{r['ratio']:.1f}x | {r['eval_loss']:.3f} ± {r['loss_spread']:.3f} | "
            f"{r['relative']:.3f} ± {r['spread']:.3f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="char")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"])
    parser.add_argument(
        "--methods", nargs="+", default=["allreduce", "default@10", "default@50", "default@100"]
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", help="write every run's result here")
    parser.add_argument("--progress", help="append each run's result here as it ends")
    args = parser.parse_args(argv)
    methods = list(args.methods)
    if "allreduce" not in methods:
        methods.insert(0, "allreduce")
    for method in methods:
        check_method(method)
    runs = [
        Run(seed, optimizer, method, args.steps, model=args.model)
        for seed in args.seeds
        for optimizer in args.optimizers
        for method in methods
    ]
    results = compare(runs, progress=args.progress)
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
