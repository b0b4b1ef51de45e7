"""One rank of ``sketchcomm bench comm``: train the seeded character Llama with one DDP hook.

Started by :mod:`benchmarks.comm` as ``python -m benchmarks.comm_worker --config
CONFIG --out OUT [--interface IF]`` with ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and
``WORLD_SIZE`` in the environment (gloo, one CPU thread). Every hook trains the same model
(:func:`benchmarks.char_lm.make_lm`, seeded) on the same batches (``lm_batches`` seeded by the seed
and the rank) with SGD at the same learning rate; the momentum ``rho`` lives in the optimizer for
the dense hooks and in sketch space for the sketch hooks (FetchSGD), where plain SGD applies the
recovered update.

Each step is timed from ``zero_grad`` to ``optimizer.step`` (DDP's backward returns once every
bucket's hook future is done, so the time includes the communication). Before the first timed
step (after ``warmup`` steps and a barrier) and after the last one, the worker reads

* the ``tx_bytes`` counter of its veth interface (``/sys/class/net/IF/statistics/tx_bytes``, as
  seen inside its namespace): the bytes on the wire, headers and acknowledgements included;
* the bytes the hook itself handed to its collectives (:func:`hook_bytes`).

The result (``--out``) is JSON: per-step times and losses, both byte counts, the held-out loss and,
for the private hook, the privacy spent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.char_lm import BENCH_LM, TINY_LM, lm_batches, lm_loss, load_char_text, make_lm
from sketchcomm import hook_kinds
from sketchcomm.hook_kinds import register_hook_kind

__all__ = ["HOOKS", "WorkerConfig", "check_hook", "hook_bytes"]

# Every hook the benchmark knows, in report order.
HOOKS = (
    "allreduce",
    "fp16",
    "powersgd-r1",
    "powersgd-r4",
    "sketch-10x",
    "sketch-20x",
    "sketch-50x",
    "sketch-100x",
    "private-sketch-20x",
    "noop",
)
MODELS = {"bench": BENCH_LM, "tiny": TINY_LM}
_PATTERN = re.compile(r"^(allreduce|fp16|noop|powersgd-r(\d+)|(private-)?sketch-(\d+)x)$")


def check_hook(name: str) -> str:
    """``name`` if it is a hook this worker can run (see :data:`HOOKS`), else ``ValueError``."""
    if not _PATTERN.match(name):
        raise ValueError(
            f"hook must be one of {', '.join(HOOKS)} (any rank or ratio), got {name!r}"
        )
    return name


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank of one run needs; written as JSON by the harness."""

    hook: str
    model: str
    steps: int
    warmup: int
    batch_size: int
    seq_len: int
    lr: float
    momentum: float
    topk_fraction: float
    seed: int
    eval_batches: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float


def _is_sketch(hook: str) -> bool:
    return "sketch" in hook


def _noop() -> tuple[None, Callable]:
    from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks

    return None, debugging_hooks.noop_hook


register_hook_kind("noop", _noop, "sends nothing: the time of everything but communication")


def kind_and_options(config: WorkerConfig, rank: int) -> tuple[str, dict[str, Any]]:
    """The :mod:`sketchcomm.hook_kinds` kind that ``config.hook`` names, and its options:
    ``powersgd-rR`` is PowerSGD of rank R, ``sketch-Cx`` the sketch at compression C and
    ``private-sketch-Cx`` the private sketch (``unit="rank"``) at compression C."""
    match = _PATTERN.match(check_hook(config.hook))
    if match is None:
        raise ValueError(f"unknown hook {config.hook!r}")
    if match.group(2):
        return "powersgd", {"rank": int(match.group(2)), "seed": config.seed}
    if not match.group(4):
        return config.hook, {}
    sketch = {
        "compression": float(match.group(4)),
        "momentum": config.momentum,
        "seed": config.seed,
        "topk_fraction": config.topk_fraction,
    }
    if not match.group(3):
        return "sketch", sketch
    from sketchcomm.privacy import PrivacyLedger

    ledger = PrivacyLedger("rdp", config.delta, unit="rank", writer=rank == 0)
    private = {
        "ledger": ledger,
        "max_grad_norm": config.max_grad_norm,
        "unit": "rank",
        "noise_multiplier": config.noise_multiplier,
    }
    return "private", {**private, **sketch}


def attach_hook(ddp: DDP, config: WorkerConfig, rank: int) -> object | None:
    """Register ``config.hook`` on ``ddp``; returns its state (None for the stateless hooks)."""
    kind, options = kind_and_options(config, rank)
    return hook_kinds.attach_hook(ddp, kind, **options)


def hook_bytes(hook: str, state: object | None, parameters: int, steps: int) -> int:
    """Bytes this rank has handed to the hook's collectives in ``steps`` steps so far.

    allreduce: 4 per gradient element, fp16: 2, noop: 0; PowerSGD: 4 per element of its factors
    and uncompressed tensors (its ``total_numel_after_compression``, counted from its first
    compressed step); sketch hooks: the tables they allreduced (``stats.total_bytes_sent``).
    """
    if hook in ("allreduce", "fp16", "noop"):
        return {"allreduce": 4, "fp16": 2, "noop": 0}[hook] * parameters * steps
    if hook.startswith("powersgd"):
        return 4 * int(state.total_numel_after_compression)  # type: ignore[union-attr]
    return int(state.stats.total_bytes_sent)  # type: ignore[union-attr]


def read_tx_bytes(interface: str | None) -> int | None:
    """The transmitted-bytes counter of ``interface`` (None without an interface)."""
    if not interface:
        return None
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def held_out_loss(model: nn.Module, ids: torch.Tensor, config: WorkerConfig) -> float:
    """Mean loss over ``eval_batches`` fixed ``[batch_size, seq_len]`` windows of held-out text."""
    batches = lm_batches(ids, config.batch_size, config.seq_len, seed=config.seed + 1, rank=0)
    model.eval()
    with torch.no_grad():
        losses = [lm_loss(model, next(batches)).item() for _ in range(config.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def train(config: WorkerConfig, interface: str | None) -> dict[str, Any]:
    """Train for ``config.steps`` steps in the current process group; this rank's measurements."""
    rank = dist.get_rank()
    text = load_char_text()
    model = make_lm(text.vocab_size, MODELS[config.model], seed=config.seed)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # PowerSGD starts collectives from future callbacks: on gloo it needs a single bucket.
    bucket_mb = 1024 if config.hook.startswith("powersgd") else 25
    ddp = DDP(model, bucket_cap_mb=bucket_mb, broadcast_buffers=False)
    state = attach_hook(ddp, config, rank)
    optimizer_momentum = 0.0 if _is_sketch(config.hook) else config.momentum
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=optimizer_momentum)
    batches = lm_batches(text.train, config.batch_size, config.seq_len, seed=config.seed, rank=rank)
    times: list[float] = []
    losses: list[float] = []
    for step in range(config.steps):
        if step == config.warmup:
            dist.barrier()
            tx_before = read_tx_bytes(interface)
            hook_before = hook_bytes(config.hook, state, parameters, step)
        batch = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(ddp, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    tx_after = read_tx_bytes(interface)
    timed = config.steps - config.warmup
    hook_total = hook_bytes(config.hook, state, parameters, config.steps) - hook_before
    result: dict[str, Any] = {
        "rank": rank,
        "parameters": parameters,
        "step_times": times,
        "losses": losses,
        "eval_loss": held_out_loss(model, text.test, config),
        "hook_bytes_per_step": hook_total / timed,
        "wire_bytes_per_step": None if tx_after is None else (tx_after - tx_before) / timed,
    }
    ledger = getattr(state, "ledger", None)
    if ledger is not None:
        result["privacy"] = {
            "unit": ledger.unit,
            "epsilon": ledger.epsilon,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "steps": ledger.steps,
            "noise_multiplier": config.noise_multiplier,
            "max_grad_norm": config.max_grad_norm,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file of a WorkerConfig")
    parser.add_argument("--out", required=True, help="JSON file to write this rank's result to")
    parser.add_argument("--interface", help="network interface whose tx_bytes to read")
    args = parser.parse_args(argv)
    config = WorkerConfig(**json.loads(Path(args.config).read_text()))
    if not 0 <= config.warmup < config.steps:
        raise ValueError(f"warmup must be in [0, steps), got {config.warmup} of {config.steps}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    try:
        result = train(config, args.interface)
        result["config"] = asdict(config)
        result["world_size"] = dist.get_world_size()
        Path(args.out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
