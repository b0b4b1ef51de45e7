r"""Privacy benchmark: test accuracy against epsilon on the digits data, over real gloo ranks.

Every method trains the digits MLP (:func:`sketchcomm.training.make_mlp`, 1,437 training and 360
test images) with DDP on ``world`` processes joined by gloo, on batches drawn by Poisson sampling
at rate ``q = batch_size / N`` (Opacus's ``DistributedUniformWithReplacementSampler``, an
independent generator per rank so that every example is included independently), for ``steps``
SGD steps. The private methods release, per step, the Poisson subsampled Gaussian mechanism with
clipping norm ``C`` and the *same* noise multiplier ``\sigma``, calibrated once per target
epsilon with the chosen Opacus accountant for ``(q, steps, delta)``; each run's
:class:`~sketchcomm.privacy.PrivacyLedger` enforces the target as its budget and reports the
epsilon spent. The unit of privacy is one training example (add/remove-one adjacency). Methods
(:data:`METHODS`):

* ``nonprivate``: plain allreduce of the gradient of the summed loss divided by ``q N``; the
  accuracy ceiling.
* ``sketch``: :class:`~sketchcomm.privacy.DPSketchState` at ``compression``: per-example Count
  Sketch tables clipped to ``C``, noise in sketch space, FetchSGD top-k recovery with sketch-space
  momentum and error.
* ``dpsgd``: the same hook with every bucket uncompressed (an exact one-row table per bucket), which
  is DP-SGD with per-bucket clipping thresholds.
* ``opacus``: DP-SGD by Opacus (``GradSampleModule``, ``DPOptimizer``, the same accountant) in one
  process, with the same ``\sigma``, ``C``, ``q`` and steps: an independent reference.
* ``sep-sketch``, ``sep-topk``, ``sep-randk``: noise in gradient space, then compression at the
  private sketch's bytes per step (:mod:`sketchcomm.bench.baselines`). ``sep-topk`` gives every
  rank its ``1/W`` share of the noise, like the others; but each rank's message is seen by the
  other ranks, and towards them it is DP only with noise multiplier ``\sigma / \sqrt W``, which
  favours this baseline. ``sep-topk-local`` has every rank add the full ``N(0, \sigma^2 C^2)``,
  which keeps the stated epsilon towards every observer of the messages.

Learning rate and momentum are set per method (:data:`TUNED`, chosen by :func:`run_sweep`): a
single step size cannot suit both a dense update and a top-k update with error feedback. Momentum
``rho`` lives where each method needs it: in sketch space (``sketch``, ``sep-sketch``), in the
local error feedback (``sep-topk``, ``sep-topk-local``), in the optimizer (the others). Sketching
and compression add no privacy; every epsilon comes from the noise.

Run it as ``python -m sketchcomm.bench.privacy`` (or mounted as a ``sketchcomm bench privacy``
command through :func:`configure` and :func:`run`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from opacus.utils.uniform_sampler import (
    DistributedUniformWithReplacementSampler,
    UniformWithReplacementSampler,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.bench.baselines import SeparateNoiseState
from sketchcomm.privacy import DPSketchState, PrivacyLedger, calibrate_noise_multiplier
from sketchcomm.sketch import derive_seed
from sketchcomm.training import Digits, accuracy, load_digits, make_mlp

__all__ = [
    "GRID",
    "METHODS",
    "SWEEP",
    "TUNED",
    "BenchConfig",
    "configure",
    "markdown_table",
    "plot_accuracy",
    "run",
    "run_privacy_bench",
    "run_sweep",
    "summarize",
]

#: Every method of the benchmark, with a one-line description.
METHODS: dict[str, str] = {
    "nonprivate": "no privacy: allreduce of the gradient (ceiling)",
    "sketch": "private sketch: clip and noise in sketch space, FetchSGD top-k recovery",
    "dpsgd": "DP-SGD: the private hook with uncompressed one-row tables",
    "opacus": "DP-SGD by Opacus in one process (independent reference)",
    "sep-sketch": "noise in gradient space, then Count Sketch with FetchSGD recovery",
    "sep-topk": "noise in gradient space, then local top-k with error feedback (allgather)",
    "sep-randk": "noise in gradient space, then shared random-k, scaled by d/k (allreduce)",
    "sep-topk-local": "as sep-topk, with the full noise in every rank's message",
}

#: (learning rate, momentum) of each method: the best mean test accuracy at epsilon 4 over two
#: seeds of the lr x momentum grid of :func:`run_sweep` (see docs/privacy-benchmark.md);
#: ``opacus`` takes ``dpsgd``'s.
TUNED: dict[str, tuple[float, float]] = {
    "nonprivate": (1.0, 0.0),
    "sketch": (1.0, 0.5),
    "dpsgd": (0.5, 0.0),
    "opacus": (0.5, 0.0),
    "sep-sketch": (0.25, 0.5),
    "sep-topk": (0.5, 0.0),
    "sep-randk": (0.1, 0.0),
    "sep-topk-local": (0.5, 0.0),
}

# method -> (compressor, per-message noise)
_COMPRESSORS = {
    "sep-sketch": ("sketch", False),
    "sep-topk": ("topk", False),
    "sep-randk": ("randk", False),
    "sep-topk-local": ("topk", True),
}
_HOOK_MOMENTUM = ("sketch", "sep-sketch", "sep-topk", "sep-topk-local")
# Buckets of the small MLPs are compressed too; the table still needs c >= sqrt(d).
_MIN_COMPRESSION_SIZE = 1024


@dataclass(frozen=True)
class BenchConfig:
    """Training settings shared by every method.

    Attributes:
        steps: optimizer steps ``T``.
        batch_size: expected global batch ``q N``; the sample rate is ``q = batch_size / N``.
        lr: SGD learning rate of every method (the private updates are the clipped, noised sum
            divided by ``q N``); None for each method's value in :data:`TUNED`.
        max_grad_norm: clipping norm ``C`` of one example's gradient (or table), all buckets.
        hidden: hidden width of the MLP.
        compression: bucket elements per table element of the sketch (and byte budget of the
            separate-noise baselines).
        topk_fraction: coordinates recovered per step by FetchSGD, as a fraction of the bucket.
        momentum: momentum ``rho`` of every method (see the module docstring for where it is
            applied); None for each method's value in :data:`TUNED`.
        delta: the ``delta`` of every epsilon.
        accountant: Opacus accountant for calibration and ledgers: ``"rdp"``, ``"prv"``, ``"gdp"``.
        world: number of ranks (gloo processes).
    """

    steps: int = 128
    batch_size: int = 64
    lr: float | None = None
    max_grad_norm: float = 1.0
    hidden: int = 128
    compression: float = 20.0
    topk_fraction: float = 0.1
    momentum: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    world: int = 2

    def optimizer(self, method: str) -> tuple[float, float]:
        """``(learning rate, momentum)`` of ``method``."""
        lr, momentum = TUNED[method]
        return (
            lr if self.lr is None else self.lr,
            momentum if self.momentum is None else self.momentum,
        )


@dataclass(frozen=True)
class _Job:
    method: str
    seed: int
    config: BenchConfig
    epsilon: float | None = None
    noise_multiplier: float | None = None
    label: str = ""


# ------------------------------------------------------------------------------ one rank
def _poisson_batches(n: int, q: float, steps: int, seed: int) -> list[torch.Tensor]:
    """This rank's index batches: Opacus's distributed Poisson sampler over a shard of the data,
    with a generator of its own (independent inclusion of every example across ranks)."""
    generator = torch.Generator().manual_seed(derive_seed("poisson", seed, dist.get_rank()))
    sampler = DistributedUniformWithReplacementSampler(
        total_size=n, sample_rate=q, shuffle_seed=seed, steps=steps, generator=generator
    )
    batches = list(sampler)
    if len(batches) != steps:  # the sampler skips empty batches, which would desynchronise ranks
        raise RuntimeError(f"{steps - len(batches)} empty Poisson batches: raise batch_size")
    return batches


def _hook_state(job: _Job, ddp_model: DDP, n: int, q: float) -> DPSketchState | None:
    """The registered hook state of a distributed method (None for plain allreduce)."""
    if job.method == "nonprivate":
        return None
    cfg = job.config
    _, momentum = cfg.optimizer(job.method)
    assert job.epsilon is not None and job.noise_multiplier is not None
    ledger = PrivacyLedger(cfg.accountant, cfg.delta, budget=job.epsilon, dataset_size=n)
    common: dict[str, Any] = {
        "unit": "example", "sample_rate": q, "dataset_size": n,
        "noise_multiplier": job.noise_multiplier, "compression": cfg.compression,
        "topk_fraction": cfg.topk_fraction, "seed": job.seed,
        "min_compression_size": _MIN_COMPRESSION_SIZE,
        "momentum": momentum if job.method in _HOOK_MOMENTUM else 0.0,
    }  # fmt: skip
    if job.method == "sketch":
        state: DPSketchState = DPSketchState(ledger, cfg.max_grad_norm, **common)
    elif job.method == "dpsgd":
        state = DPSketchState(
            ledger, cfg.max_grad_norm, **{**common, "min_compression_size": 1 << 62}
        )
    else:
        compressor, per_message = _COMPRESSORS[job.method]
        state = SeparateNoiseState(
            ledger, cfg.max_grad_norm, compressor, per_message_noise=per_message, **common
        )
    state.register(ddp_model)
    return state


def _train_rank(job: _Job, data: Digits) -> dict[str, Any]:
    """Train one method on this rank; returns its row (the same on every rank)."""
    cfg, world = job.config, dist.get_world_size()
    n = len(data.x_train)
    q = cfg.batch_size / n
    model = make_mlp(cfg.hidden, job.seed)
    ddp_model = DDP(model)
    state = _hook_state(job, ddp_model, n, q)
    lr, momentum = cfg.optimizer(job.method)
    momentum = 0.0 if job.method in _HOOK_MOMENTUM else momentum
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=lr, momentum=momentum)
    # DDP averages over ranks: scale the plain allreduce to (sum over the batch) / (q N).
    scale = 1.0 if state is not None else world / (q * n)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    start = time.perf_counter()
    for index in _poisson_batches(n, q, cfg.steps, job.seed):
        optimizer.zero_grad(set_to_none=True)
        (loss_fn(ddp_model(data.x_train[index]), data.y_train[index]) * scale).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return _row(
        job, accuracy(model, data.x_test, data.y_test), seconds,
        epsilon=state.ledger.epsilon if state is not None else None,
        bytes_per_step=state.stats.step_bytes_sent if state is not None else 4 * params,
    )  # fmt: skip


def _row(
    job: _Job, test_accuracy: float, seconds: float, *, epsilon: float | None, bytes_per_step: int
) -> dict[str, Any]:
    return {
        "method": job.method, "label": job.label, "seed": job.seed,
        "epsilon_target": job.epsilon, "epsilon": epsilon,
        "noise_multiplier": job.noise_multiplier, "test_accuracy": test_accuracy,
        "bytes_per_step": bytes_per_step, "steps": job.config.steps, "seconds": seconds,
    }  # fmt: skip


def _rank_main(
    rank: int, world: int, store: str, jobs: list[_Job], out: str, verbose: bool
) -> None:
    """Entry point of one spawned rank: run every job in order; rank 0 writes the rows."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = load_digits()
        rows = []
        for job in jobs:
            rows.append(_train_rank(job, data))
            if verbose and rank == 0:
                print(_describe(rows[-1]), file=sys.stderr, flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(jobs: list[_Job], world: int, verbose: bool) -> list[dict[str, Any]]:
    """Run ``jobs`` on ``world`` fresh gloo processes; a failing rank ends the others."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        args = (world, os.path.join(tmp, "store"), jobs, out, verbose)
        mp.spawn(_rank_main, args=args, nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _opacus_row(job: _Job, data: Digits) -> dict[str, Any]:
    """DP-SGD by Opacus in this process: mean loss, per-example gradients rescaled by the batch
    (``GradSampleModule``), flat clipping to ``C``, noise ``N(0, sigma^2 C^2)`` and division by the
    expected batch ``q N`` (``DPOptimizer``), the accountant stepped at rate ``q``."""
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    cfg = job.config
    n = len(data.x_train)
    q = cfg.batch_size / n
    lr, momentum = cfg.optimizer(job.method)
    model = GradSampleModule(make_mlp(cfg.hidden, job.seed), loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        noise_multiplier=job.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=cfg.batch_size, loss_reduction="mean",
    )  # fmt: skip
    accountant = create_accountant(mechanism=cfg.accountant)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    generator = torch.Generator().manual_seed(derive_seed("poisson", job.seed, "opacus"))
    sampler = UniformWithReplacementSampler(
        num_samples=n, sample_rate=q, generator=generator, steps=cfg.steps
    )
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The first layer's input needs no gradient, which Opacus's backward hooks point out.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for index in sampler:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[index]), data.y_train[index]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return _row(
        job, accuracy(model, data.x_test, data.y_test), seconds,
        epsilon=accountant.get_epsilon(cfg.delta), bytes_per_step=4 * params,
    )  # fmt: skip


def _describe(row: dict[str, Any]) -> str:
    eps = "inf" if row["epsilon_target"] is None else f"{row['epsilon_target']:g}"
    label = f" [{row['label']}]" if row["label"] else ""
    return (
        f"{row['method']:<11} eps {eps:<4} seed {row['seed']}{label}: "
        f"accuracy {row['test_accuracy']:.4f} ({row['seconds']:.1f} s)"
    )


# ------------------------------------------------------------------------------ harness
def _sigma(cfg: BenchConfig, epsilon: float) -> float:
    q = cfg.batch_size / len(load_digits().x_train)
    return calibrate_noise_multiplier(
        epsilon, cfg.delta, q, steps=cfg.steps, accountant=cfg.accountant
    )


def _run_jobs(jobs: list[_Job], world: int, verbose: bool) -> list[dict[str, Any]]:
    """Opacus jobs in this process, the others on one set of ranks per target epsilon."""
    rows: list[dict[str, Any]] = []
    distributed = [job for job in jobs if job.method != "opacus"]
    for epsilon in dict.fromkeys(job.epsilon for job in distributed):
        rows += _launch([job for job in distributed if job.epsilon == epsilon], world, verbose)
    local = [job for job in jobs if job.method == "opacus"]
    if local:
        data = load_digits()
        for job in local:
            rows.append(_opacus_row(job, data))
            if verbose:
                print(_describe(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run_privacy_bench(
    epsilons: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = tuple(METHODS),
    config: BenchConfig | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Train every method for every target epsilon and seed; returns one row per run.

    ``nonprivate`` runs once per seed (``epsilon_target`` None). Every private run of a target
    epsilon uses the same noise multiplier, calibrated for it. A row holds ``method``, ``seed``,
    ``epsilon_target``, ``epsilon`` (spent, from the run's ledger or Opacus's accountant, at
    ``config.delta``), ``noise_multiplier``, ``test_accuracy``, ``bytes_per_step`` (sent per rank),
    ``steps``, ``seconds`` and ``label`` (empty here; the sweep names its setting there).
    """
    cfg = config or BenchConfig()
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    sigmas = {epsilon: _sigma(cfg, epsilon) for epsilon in epsilons}
    jobs = [
        _Job(method, seed, cfg, epsilon, sigmas[epsilon])
        for epsilon in epsilons
        for method in methods
        if method != "nonprivate"
        for seed in seeds
    ]
    if "nonprivate" in methods:
        jobs = [_Job("nonprivate", seed, cfg) for seed in seeds] + jobs
    return _run_jobs(jobs, cfg.world, verbose)


#: The learning rate x momentum grid of :func:`run_sweep`.
GRID: dict[str, tuple[float, ...]] = {
    "lr": (0.1, 0.25, 0.5, 1.0, 2.0),
    "momentum": (0.0, 0.5, 0.9),
}

#: One-at-a-time variations of :func:`run_sweep` around the base settings.
SWEEP: dict[str, tuple[Any, ...]] = {
    "max_grad_norm": (0.5, 2.0),
    "hidden": (64, 256, 512),
    "topk_fraction": (0.01, 0.02, 0.1),
    "batch_size": (32, 128),
    "steps": (200,),
}


def run_sweep(
    base: BenchConfig | None = None,
    epsilon: float = 4.0,
    seeds: Sequence[int] = (100, 101),
    grid_methods: Sequence[str] = tuple(m for m in METHODS if m != "opacus"),
    methods: Sequence[str] = ("sketch", "dpsgd"),
    grid: dict[str, Sequence[float]] | None = None,
    variations: dict[str, Sequence[Any]] | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """The hyperparameter sweep at ``epsilon``: every ``grid_methods`` at every learning rate and
    momentum of ``grid`` (labels like ``"lr=0.5 momentum=0.9"``), then ``methods`` at the base
    settings (label ``"base"``; by default each method at its :data:`TUNED` optimizer) and at each
    one-at-a-time variation of it (labels like ``"hidden=256"``). The noise multiplier is
    calibrated per setting (it depends on the steps and the batch)."""
    base = base or BenchConfig()
    grid = GRID if grid is None else grid
    settings = [
        (f"lr={lr:g} momentum={momentum:g}", replace(base, lr=lr, momentum=momentum), grid_methods)
        for lr in grid["lr"]
        for momentum in grid["momentum"]
    ]
    settings.append(("base", base, methods))
    settings += [
        (f"{name}={value:g}", replace(base, **{name: value}), methods)
        for name, values in (SWEEP if variations is None else variations).items()
        for value in values
    ]
    jobs = []
    for label, cfg, names in settings:
        sigma = _sigma(cfg, epsilon)
        jobs += [
            _Job(m, s, cfg, label=label)
            if m == "nonprivate"
            else _Job(m, s, cfg, epsilon, sigma, label)
            for m in names
            for s in seeds
        ]
    return _run_jobs(jobs, base.world, verbose)


# ------------------------------------------------------------------------------ reports
def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (0 for one run) of the test accuracy per (label,
    method, target epsilon), with the largest epsilon spent and the bytes sent per step."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["method"], row["epsilon_target"]), []).append(row)
    summary = []
    for (label, method, target), members in groups.items():
        accuracies = [r["test_accuracy"] for r in members]
        spent = [r["epsilon"] for r in members if r["epsilon"] is not None]
        summary.append({
            "label": label, "method": method, "epsilon_target": target,
            "epsilon_max": max(spent) if spent else None, "runs": len(members),
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "bytes_per_step": members[0]["bytes_per_step"],
        })  # fmt: skip
    return summary


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def markdown_table(summary: Sequence[dict[str, Any]], config: BenchConfig) -> str:
    """Test accuracy (%, mean ± standard deviation over seeds) as a Markdown table: per method
    and target epsilon with the bytes each rank sends per step, or for the rows of a sweep (which
    carry labels), per setting and method. A footnote states the privacy guarantee."""
    by_key = {(s["label"], s["method"], s["epsilon_target"]): s for s in summary}
    labels = list(dict.fromkeys(s["label"] for s in summary))
    methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
    targets = sorted({s["epsilon_target"] for s in summary if s["epsilon_target"] is not None})
    if labels == [""]:
        ceiling = ["no privacy"] if any(s["epsilon_target"] is None for s in summary) else []
        columns = [*targets, None] if ceiling else targets
        head = ["method", "bytes/step"] + [f"ε = {t:g}" for t in targets] + ceiling
        body = []
        for method in methods:
            entries = [by_key.get(("", method, t)) for t in columns]
            nbytes = next(e for e in entries if e is not None)["bytes_per_step"]
            body.append([method, f"{nbytes:,}"] + [_cell(e) for e in entries])
    else:
        head = ["setting", *methods]
        body = [[label] + [_cell(_lookup(by_key, label, m)) for m in methods] for label in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", "Test accuracy in % (mean ± sample standard deviation over seeds)."]
    if targets:
        spent = [
            f"{t:g} → {max(s['epsilon_max'] for s in summary if s['epsilon_target'] == t):.3f}"
            for t in targets
        ]
        lines[-1] += (
            f" Privacy: (ε, δ = {config.delta:g})-DP per training example, add/remove-one "
            f"adjacency, Poisson sampling, {config.accountant} accountant; largest ε spent per "
            "target: " + ", ".join(spent) + "."
        )
    return "\n".join(lines)


def _lookup(by_key: dict[tuple, dict[str, Any]], label: str, method: str) -> dict[str, Any] | None:
    """The summary entry of ``method`` in sweep setting ``label`` (at whatever epsilon)."""
    return next((e for (lab, m, _), e in by_key.items() if lab == label and m == method), None)


def plot_accuracy(summary: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Save a PNG of test accuracy against target epsilon (log scale), one line per method with
    ± one standard deviation, the non-private ceiling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for method in METHODS:
        entries = sorted(
            (s for s in summary if s["method"] == method and s["epsilon_target"] is not None),
            key=lambda s: s["epsilon_target"],
        )
        ceiling = [s for s in summary if s["method"] == method and s["epsilon_target"] is None]
        if entries:
            ax.errorbar(
                [s["epsilon_target"] for s in entries], [s["mean"] for s in entries],
                yerr=[s["std"] for s in entries], marker="o", capsize=3, label=method,
            )  # fmt: skip
        for s in ceiling:
            ax.axhline(s["mean"], color="black", linestyle="--", label="no privacy (ceiling)")
    targets = sorted({s["epsilon_target"] for s in summary if s["epsilon_target"] is not None})
    ax.set_xscale("log", base=2)
    ax.set_xticks(targets, [f"{t:g}" for t in targets])
    ax.set_xlabel("target ε (δ = 1e-5, per example)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits MLP, 2 ranks: accuracy against privacy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPU cores ({platform.machine()}), torch {torch.__version__}, gloo"


# ------------------------------------------------------------------------------ command line
_OPTION_HELP = {
    "steps": "optimizer steps",
    "batch_size": "expected global batch; sample rate q = batch / N",
    "max_grad_norm": "clipping norm C of one example",
    "hidden": "hidden width of the MLP",
    "compression": "bucket elements per sketch table element (also the baselines' byte budget)",
    "topk_fraction": "coordinates recovered per step by FetchSGD, fraction of the bucket",
    "delta": "delta of every epsilon",
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the ``privacy`` benchmark command."""
    defaults = BenchConfig()
    parser.add_argument(
        "--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="target epsilons"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per method")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds start here (default 0)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods"
    )
    for name, help_text in _OPTION_HELP.items():
        value = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=type(value), default=value,
            help=f"{help_text} (default {value:g})",
        )  # fmt: skip
    for name in ("lr", "momentum"):
        parser.add_argument(
            f"--{name}", type=float,
            help=f"SGD {name} of every method (default: each method's own, see TUNED)",
        )  # fmt: skip
    parser.add_argument(
        "--accountant", choices=("rdp", "prv", "gdp"), default=defaults.accountant,
        help="Opacus accountant for calibration and the ledgers (default rdp)",
    )  # fmt: skip
    parser.add_argument("--world", type=int, default=defaults.world, help="ranks (default 2)")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run in under two minutes: epsilon 4, one seed, 30 steps",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", action="store_true",
        help="instead of the benchmark, the sweep at the first epsilon: every method on the "
        "lr x momentum GRID, then the sketch and DP-SGD under one-at-a-time variations (SWEEP)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write config, rows and summary as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown table")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of accuracy against epsilon")
    parser.add_argument("--quiet", action="store_true", help="no line per finished run")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or the sweep), print the table and write the requested files."""
    counts = {"--seeds": args.seeds, "--world": args.world, "--steps": args.steps,
              "--batch-size": args.batch_size, "--hidden": args.hidden}  # fmt: skip
    bad = [f"{name} must be at least 1" for name, value in counts.items() if value < 1]
    bad += [f"--epsilons must be positive, got {e:g}" for e in args.epsilons if not e > 0]
    if bad:
        print("; ".join(bad), file=sys.stderr)
        return 2
    fields = {name: getattr(args, name) for name in asdict(BenchConfig())}
    if args.quick:
        fields["steps"] = 30
    config = BenchConfig(**fields)
    epsilons = [4.0] if args.quick else list(args.epsilons)
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    verbose = not args.quiet
    start = time.perf_counter()
    if args.sweep:
        rows = run_sweep(config, epsilons[0], seeds, verbose=verbose)
    else:
        rows = run_privacy_bench(epsilons, seeds, args.methods, config, verbose)
    summary = summarize(rows)
    table = markdown_table(summary, config)
    print(table)
    report = {
        "config": asdict(config), "tuned": TUNED, "epsilons": epsilons, "seeds": seeds,
        "noise_multipliers": {
            f"{r['epsilon_target']:g}": r["noise_multiplier"]
            for r in rows
            if r["epsilon_target"] is not None and r["label"] in ("", "base")
        },
        "machine": _machine(), "seconds": time.perf_counter() - start, "rows": rows,
        "summary": summary,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.plot:
        plot_accuracy(summary, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
