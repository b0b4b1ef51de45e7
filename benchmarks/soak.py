r"""Soak benchmark: memory and step time of the hooks over thousands of steps on real gloo ranks.

Each hook of :data:`HOOKS` trains the digits MLP (:func:`sketchcomm.demo.digits.make_mlp`) with DDP
on ``world`` freshly spawned processes for ``steps`` SGD steps, on batches drawn by Poisson
sampling (every training example of a rank's shard included independently with probability
``q = world * batch_size / N``). Every ``every`` steps each rank records:

* the resident set size of its process (``/proc/self/statm``: resident pages times the page size);
* the bytes of every tensor reachable from the hook's state (per-bucket hash parameters,
  FetchSGD's error and momentum tables, pending per-example gradients), counted once per storage:
  :func:`state_tensor_bytes`;
* the mean wall time of the steps since the last record (forward, backward with the hook,
  optimizer step).

Hooks: ``allreduce`` (DDP's own, the baseline), ``sketch`` (:class:`~sketchcomm.SketchState`,
top-k with sketch-space momentum and error), ``private``
(:class:`~sketchcomm.privacy.DPSketchState`, per-example clipping, noise multiplier 1, an RDP
ledger recording every step). The private run is a resource measurement: its batches follow the
Poisson sampling that its accounting assumes, but no privacy is claimed from it here.

A leak shows as growth that does not level off: :func:`summarize` fits a line to RSS and step time
over the first and the second half of the run after warm-up (the first 10% of the steps, which
include DDP's bucket rebuild), and checks that the state bytes are constant after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.arguments import positive_int
from sketchcomm.demo.digits import accuracy, load_digits, make_mlp
from sketchcomm.hook_kinds import attach_hook
from sketchcomm.privacy import DPSketchState, PrivacyLedger
from sketchcomm.sketch import derive_seed

__all__ = [
    "HOOKS",
    "SoakConfig",
    "configure",
    "markdown_table",
    "plot_soak",
    "rss_bytes",
    "run",
    "run_soak",
    "state_tensor_bytes",
    "summarize",
]

#: hook kind (:mod:`sketchcomm.hook_kinds`) -> (learning rate, momentum of the sketch-space state)
_OPTIMIZER = {"allreduce": (0.1, 0.0), "sketch": (0.1, 0.5), "private": (1.0, 0.5)}
#: the hook kinds the soak runs
HOOKS = tuple(_OPTIMIZER)
_MIN_COMPRESSION_SIZE = 1024
_WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class SoakConfig:
    """Settings of a soak run.

    Attributes:
        steps: SGD steps per hook.
        every: steps between records.
        hidden: hidden width of the MLP.
        batch_size: expected batch per rank (Poisson).
        compression: bucket elements per table element (sketch and private hooks).
        world: number of gloo ranks.
        seed: seed of the model, the batches and the hashes.
    """

    steps: int = 3000
    every: int = 50
    hidden: int = 256
    batch_size: int = 32
    compression: float = 20.0
    world: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "every", "hidden", "batch_size", "world"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.steps < 10 * self.every:
            raise ValueError(f"steps ({self.steps}) must be at least 10 x every ({self.every})")
        if not self.compression > 1:
            raise ValueError(f"compression must exceed 1, got {self.compression!r}")


# ------------------------------------------------------------------------------ measurements
def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; elsewhere the peak
    from ``getrusage``, which can only grow)."""
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def state_tensor_bytes(root: object) -> int:
    """Bytes of the tensor storages reachable from ``root`` through containers and object
    attributes (each storage once; modules are not entered, their parameters are the model's)."""
    seen_objects: set[int] = set()
    seen_storages: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, nn.Module):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


# ------------------------------------------------------------------------------ one rank
def _hook_state(hook: str, model: DDP, config: SoakConfig, n: int, q: float) -> Any:
    """Attach the :mod:`sketchcomm.hook_kinds` kind ``hook`` with the soak's settings."""
    sketch = {
        "compression": config.compression,
        "topk_fraction": 0.1,
        "momentum": _OPTIMIZER[hook][1],
        "min_compression_size": _MIN_COMPRESSION_SIZE,
        "seed": config.seed,
    }
    options = {
        "allreduce": {},
        "sketch": sketch,
        "private": {
            "ledger": PrivacyLedger("rdp", 1e-5, dataset_size=n),
            "max_grad_norm": 1.0,
            "unit": "example",
            "sample_rate": q,
            "dataset_size": n,
            "noise_multiplier": 1.0,
            **sketch,
        },
    }[hook]
    return attach_hook(model, hook, **options)


def _rank_soak(rank: int, world: int, folder: str, config: SoakConfig, hook: str) -> None:
    """Entry point of one spawned rank: train with ``hook``, write this rank's records to
    ``folder/rank{rank}.json``."""
    torch.set_num_threads(1)
    store = os.path.join(folder, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = load_digits()
        n = len(data.x_train)
        shard = torch.arange(rank, n, world)
        q = world * config.batch_size / n
        model = DDP(make_mlp(config.hidden, config.seed))
        state = _hook_state(hook, model, config, n, q)
        optimizer = torch.optim.SGD(model.parameters(), lr=_OPTIMIZER[hook][0])
        # The private hook divides the summed loss by q N; the others average over ranks.
        scale = 1.0 if hook == "private" else 1.0 / config.batch_size
        sampler = torch.Generator().manual_seed(derive_seed("soak batches", config.seed, rank))
        records, elapsed = [], 0.0
        from tqdm import tqdm

        steps = tqdm(
            range(1, config.steps + 1),
            desc=f"soak {hook}",
            unit="step",
            disable=rank != 0,
            mininterval=1.0,
        )
        for step in steps:
            start = time.perf_counter()
            index = shard[torch.rand(len(shard), generator=sampler) < q]
            optimizer.zero_grad(set_to_none=True)
            logits = model(data.x_train[index])
            loss = nn.functional.cross_entropy(logits, data.y_train[index], reduction="sum")
            (loss * scale).backward()
            optimizer.step()
            elapsed += time.perf_counter() - start
            if step % config.every == 0:
                records.append(
                    {
                        "step": step,
                        "rss_bytes": rss_bytes(),
                        "state_bytes": 0 if state is None else state_tensor_bytes(state),
                        "step_seconds": elapsed / config.every,
                    }
                )
                elapsed = 0.0
        result = {
            "records": records,
            "test_accuracy": accuracy(model.module, data.x_test, data.y_test),
            "parameters": sum(p.numel() for p in model.parameters()),
            "ledger_steps": state.ledger.steps if isinstance(state, DPSketchState) else None,
        }
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(config: SoakConfig, hook: str) -> list[dict[str, Any]]:
    """Soak ``hook`` on fresh processes; returns every rank's result, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_soak, args=(config.world, tmp, config, hook), nprocs=config.world)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(config.world)]


def run_soak(config: SoakConfig, hooks: tuple[str, ...] = HOOKS) -> dict[str, list[dict]]:
    """Soak every hook in ``hooks`` in turn; returns hook -> per-rank results."""
    unknown = [hook for hook in hooks if hook not in HOOKS]
    if unknown:
        raise ValueError(f"hooks must be among {HOOKS}, got {unknown}")
    return {hook: _launch(config, hook) for hook in hooks}


# ------------------------------------------------------------------------------ analysis
def _slope_per_1000(steps: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against ``steps``, per 1000 steps."""
    return float(np.polyfit(steps, values, 1)[0] * 1000) if len(steps) > 1 else 0.0


def summarize(config: SoakConfig, results: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Per hook, over the records after warm-up (first 10% of the steps), averaged over ranks:
    RSS at the start and end and its growth; slopes of RSS (bytes per 1000 steps) and of step time
    (seconds per 1000 steps) fitted on the first and on the second half; mean step time per half;
    whether the state bytes are constant, and their value. ``leak_reference_bytes`` is what
    leaking one fp32 gradient-sized buffer per step would add over the measured window."""
    warmup = max(config.every, int(_WARMUP_FRACTION * config.steps))
    summary = []
    for hook, ranks in results.items():
        steps = np.array([r["step"] for r in ranks[0]["records"]])
        kept = steps > warmup
        rss = np.mean([[r["rss_bytes"] for r in rank["records"]] for rank in ranks], axis=0)
        seconds = np.mean([[r["step_seconds"] for r in rank["records"]] for rank in ranks], axis=0)
        state = {r["state_bytes"] for rank in ranks for r in rank["records"] if r["step"] > warmup}
        steps, rss, seconds = steps[kept], rss[kept], seconds[kept]
        half = len(steps) // 2
        first, second = slice(0, half), slice(half, None)
        summary.append(
            {
                "hook": hook,
                "warmup_steps": warmup,
                "rss_start_bytes": float(rss[0]),
                "rss_end_bytes": float(rss[-1]),
                "rss_growth_bytes": float(rss[-1] - rss[0]),
                "rss_slope_first_half": _slope_per_1000(steps[first], rss[first]),
                "rss_slope_second_half": _slope_per_1000(steps[second], rss[second]),
                "step_seconds_first_half": float(seconds[first].mean()),
                "step_seconds_second_half": float(seconds[second].mean()),
                "step_time_slope_second_half": _slope_per_1000(steps[second], seconds[second]),
                "state_bytes_constant": len(state) == 1,
                "state_bytes": max(state),
                "leak_reference_bytes": 4 * ranks[0]["parameters"] * int(steps[-1] - steps[0]),
                "test_accuracy": ranks[0]["test_accuracy"],
                "ledger_steps": ranks[0]["ledger_steps"],
            }
        )
    return summary


def markdown_table(summary: list[dict[str, Any]], config: SoakConfig) -> str:
    """The summary as a Markdown table (MiB, milliseconds), with a line on the setup."""
    mib = 1 << 20
    head = [
        "hook",
        "state bytes (constant)",
        "RSS start → end (MiB)",
        "RSS slope 1st / 2nd half (MiB per 1000 steps)",
        "step ms 1st / 2nd half",
        "step-time slope 2nd half (ms per 1000 steps)",
        "test acc.",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        constant = "yes" if s["state_bytes_constant"] else "NO"
        lines.append(
            f"| {s['hook']} | {s['state_bytes']:,} ({constant}) | "
            f"{s['rss_start_bytes'] / mib:.1f} → {s['rss_end_bytes'] / mib:.1f} | "
            f"{s['rss_slope_first_half'] / mib:+.2f} / {s['rss_slope_second_half'] / mib:+.2f} | "
            f"{1e3 * s['step_seconds_first_half']:.2f} / "
            f"{1e3 * s['step_seconds_second_half']:.2f} | "
            f"{1e3 * s['step_time_slope_second_half']:+.3f} | {100 * s['test_accuracy']:.1f}% |"
        )
    lines += [
        "",
        f"{config.steps} steps, digits MLP (hidden {config.hidden}), {config.world} gloo ranks, "
        f"Poisson batches of {config.batch_size} per rank on average, compression "
        f"{config.compression:g}; means over ranks, after {summary[0]['warmup_steps']} warm-up "
        f"steps; {_machine()}.",
    ]
    return "\n".join(lines)


def plot_soak(
    config: SoakConfig, results: dict[str, list[dict]], path: str | os.PathLike[str]
) -> None:
    """Save a PNG: RSS (MiB, rank mean) and step time (ms, rank mean) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, timing) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=100)
    for hook, ranks in results.items():
        steps = [r["step"] for r in ranks[0]["records"]]
        rss = np.mean([[r["rss_bytes"] for r in rank["records"]] for rank in ranks], axis=0)
        ms = np.mean([[r["step_seconds"] for r in rank["records"]] for rank in ranks], axis=0)
        memory.plot(steps, rss / (1 << 20), label=hook)
        timing.plot(steps, 1e3 * ms, label=hook)
    warmup = max(config.every, int(_WARMUP_FRACTION * config.steps))
    for ax, label in ((memory, "RSS (MiB, mean over ranks)"), (timing, "step time (ms)")):
        ax.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    timing.set_yscale("log")
    fig.suptitle(f"soak: digits MLP (hidden {config.hidden}), {config.world} gloo ranks")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPU cores ({platform.machine()}), torch {torch.__version__}"


# ------------------------------------------------------------------------------ command line
def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``sketchcomm bench soak``."""
    defaults = SoakConfig()
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.steps,
        help="SGD steps per hook (default %(default)s)",
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=defaults.every,
        help="steps between records of RSS, state bytes and step time (default %(default)s)",
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=defaults.hidden,
        help="hidden width of the MLP (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help="expected Poisson batch per rank (default %(default)s)",
    )
    parser.add_argument(
        "--compression",
        type=float,
        default=defaults.compression,
        help="bucket elements per sketch table element (default %(default)s)",
    )
    parser.add_argument(
        "--world",
        type=positive_int,
        default=defaults.world,
        help="gloo ranks (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default 0)")
    parser.add_argument(
        "--hooks",
        nargs="+",
        choices=HOOKS,
        default=list(HOOKS),
        help="hooks to soak (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="200 steps, a record every 10: a CI smoke run"
    )
    parser.add_argument("--json", metavar="PATH", help="write config, records and summary")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown table")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of RSS and step time")


def run(args: argparse.Namespace) -> int:
    """Run the soak, print the table and write the requested files."""
    steps, every = (200, 10) if args.quick else (args.steps, args.every)
    config = SoakConfig(
        steps=steps,
        every=every,
        hidden=args.hidden,
        batch_size=args.batch_size,
        compression=args.compression,
        world=args.world,
        seed=args.seed,
    )
    start = time.perf_counter()
    results = run_soak(config, tuple(args.hooks))
    summary = summarize(config, results)
    table = markdown_table(summary, config)
    print(table)
    if args.json:
        report = {
            "config": asdict(config),
            "machine": _machine(),
            "seconds": time.perf_counter() - start,
            "summary": summary,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.plot:
        plot_soak(config, results, args.plot)
    return 0
