r"""Runs of the privacy benchmark: every method trained on real gloo ranks, one row per run.

Every distributed method trains the task's model (:mod:`benchmarks.privacy_tasks`) with DDP
on ``world`` processes joined by gloo, on batches drawn by Poisson sampling at rate
``q = batch_size / N`` (Opacus's ``DistributedUniformWithReplacementSampler``, an independent
generator per rank so that every example is included independently), for ``steps`` SGD steps.
Private runs record every step in a :class:`~sketchcomm.privacy.PrivacyLedger` whose budget is the
target epsilon. ``opacus`` runs in this process with Opacus's own ``DPOptimizer``.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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

from benchmarks.baselines import COMPRESSORS, SeparateNoiseState
from benchmarks.privacy_config import METHODS, BenchConfig
from benchmarks.privacy_tasks import TaskData, evaluate, load_task, make_model
from sketchcomm.hook_kinds import HookFactory, attach_hook, register_hook_kind
from sketchcomm.privacy import DPSketchState, PrivacyLedger, calibrate_noise_multiplier
from sketchcomm.sketch import derive_seed

__all__ = [
    "GRID",
    "SWEEP",
    "describe_row",
    "noise_multiplier",
    "poisson_batches",
    "run_privacy_bench",
    "run_sweep",
    "sampler_seed",
]

# method -> (compressor, per-message noise)
_COMPRESSORS = {
    "sep-sketch": ("sketch", False),
    "sep-topk": ("topk", False),
    "sep-randk": ("randk", False),
    "sep-topk-local": ("topk", True),
}


def _separate_noise(compressor: str, per_message: bool) -> HookFactory:
    def build(**options: Any) -> tuple[SeparateNoiseState, Callable]:
        state = SeparateNoiseState(compressor=compressor, per_message_noise=per_message, **options)
        return state, COMPRESSORS[compressor]

    return build


def _register_baselines() -> None:
    """The separate-noise baselines as hook kinds (:mod:`sketchcomm.hook_kinds`) named after
    their methods, built with the options of :class:`SeparateNoiseState`."""
    for method, (compressor, per_message) in _COMPRESSORS.items():
        register_hook_kind(method, _separate_noise(compressor, per_message), METHODS[method])


_register_baselines()
_HOOK_MOMENTUM = ("sketch", "sep-sketch", "sep-topk", "sep-topk-local")
# Buckets of the small MLPs are compressed too; the table still needs c >= sqrt(d).
_MIN_COMPRESSION_SIZE = 1024


@dataclass(frozen=True)
class _Job:
    method: str
    seed: int
    config: BenchConfig
    epsilon: float | None = None
    noise_multiplier: float | None = None
    label: str = ""


# ------------------------------------------------------------------------------ one rank
def sampler_seed(config: BenchConfig, *parts: object) -> int:
    """The seed of one Poisson sampler: from the operating system's randomness, or, when
    ``config.sampling_seed`` is set (a run that is not private), derived from it and ``parts``."""
    if config.sampling_seed is None:
        return secrets.randbits(63)
    return derive_seed("poisson", config.sampling_seed, *parts)


def poisson_batches(config: BenchConfig, seed: int, n: int, q: float) -> list[torch.Tensor]:
    """This rank's ``config.steps`` index batches of a run with ``seed``: Opacus's distributed
    Poisson sampler at rate ``q`` over a shard of the ``n`` examples (the shard a public function
    of ``seed``), with a generator of its own (independent inclusion of every example across
    ranks; its seed from :func:`sampler_seed`)."""
    steps = config.steps
    generator = torch.Generator().manual_seed(sampler_seed(config, seed, dist.get_rank()))
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
    ledger = PrivacyLedger(
        cfg.accountant,
        cfg.delta,
        budget=job.epsilon,
        dataset_size=n,
        colluding_ranks=cfg.colluding_ranks,
    )
    common: dict[str, Any] = {
        "unit": "example",
        "sample_rate": q,
        "dataset_size": n,
        "noise_multiplier": job.noise_multiplier,
        "compression": cfg.compression,
        "topk_fraction": cfg.topk_fraction,
        "seed": job.seed,
        "min_compression_size": _MIN_COMPRESSION_SIZE,
        "momentum": momentum if job.method in _HOOK_MOMENTUM else 0.0,
        "colluding_ranks": cfg.colluding_ranks,
    }
    if job.method == "dpsgd":
        common["min_compression_size"] = 1 << 62
    kind = "private" if job.method in ("sketch", "dpsgd") else job.method
    return attach_hook(ddp_model, kind, ledger=ledger, max_grad_norm=cfg.max_grad_norm, **common)


def _train_rank(job: _Job, data: TaskData) -> dict[str, Any]:
    """Train one method on this rank; returns its row (the same on every rank)."""
    cfg, world = job.config, dist.get_world_size()
    n = data.train_size
    q = cfg.batch_size / n
    model = make_model(cfg.task, cfg.hidden, job.seed)
    ddp_model = DDP(model)
    state = _hook_state(job, ddp_model, n, q)
    lr, momentum = cfg.optimizer(job.method)
    momentum = 0.0 if job.method in _HOOK_MOMENTUM else momentum
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=lr, momentum=momentum)
    # DDP averages over ranks: scale the plain allreduce to (sum over the batch) / (q N).
    scale = 1.0 if state is not None else world / (q * n)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    start = time.perf_counter()
    for index in poisson_batches(cfg, job.seed, n, q):
        optimizer.zero_grad(set_to_none=True)
        (loss_fn(ddp_model(data.x_train[index]), data.y_train[index]) * scale).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return _row(
        job,
        model,
        data,
        seconds,
        epsilon=state.ledger.epsilon if state is not None else None,
        bytes_per_step=state.stats.step_bytes_sent if state is not None else 4 * params,
    )


def _row(
    job: _Job,
    model: nn.Module,
    data: TaskData,
    seconds: float,
    *,
    epsilon: float | None,
    bytes_per_step: int,
) -> dict[str, Any]:
    test_accuracy, test_loss = evaluate(model, data.x_test, data.y_test)
    return {
        "task": job.config.task,
        "method": job.method,
        "label": job.label,
        "seed": job.seed,
        "epsilon_target": job.epsilon,
        "epsilon": epsilon,
        "noise_multiplier": job.noise_multiplier,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "bytes_per_step": bytes_per_step,
        "steps": job.config.steps,
        "sample_rate": job.config.batch_size / data.train_size,
        "seconds": seconds,
    }


def _rank_main(
    rank: int, world: int, store: str, jobs: list[_Job], out: str, verbose: bool
) -> None:
    """Entry point of one spawned rank: run every job in order; rank 0 writes the rows."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = []
        for job in jobs:
            rows.append(_train_rank(job, load_task(job.config.task)))
            if verbose and rank == 0:
                print(describe_row(rows[-1]), file=sys.stderr, flush=True)
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


def _opacus_row(job: _Job, data: TaskData) -> dict[str, Any]:
    """DP-SGD by Opacus in this process: mean loss, per-example gradients rescaled by the batch
    (``GradSampleModule``), flat clipping to ``C``, noise ``N(0, sigma^2 C^2)`` and division by the
    expected batch ``q N`` (``DPOptimizer``), the accountant stepped at rate ``q``."""
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    cfg = job.config
    n = data.train_size
    q = cfg.batch_size / n
    lr, momentum = cfg.optimizer(job.method)
    model = GradSampleModule(make_model(cfg.task, cfg.hidden, job.seed), loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        noise_multiplier=job.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=cfg.batch_size,
        loss_reduction="mean",
    )
    accountant = create_accountant(mechanism=cfg.accountant)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    generator = torch.Generator().manual_seed(sampler_seed(cfg, job.seed, "opacus"))
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
        job,
        model,
        data,
        seconds,
        epsilon=accountant.get_epsilon(cfg.delta),
        bytes_per_step=4 * params,
    )


def describe_row(row: dict[str, Any]) -> str:
    """One line for a finished run: method, target epsilon, seed, test accuracy and time."""
    eps = "inf" if row["epsilon_target"] is None else f"{row['epsilon_target']:g}"
    label = f" [{row['label']}]" if row["label"] else ""
    return (
        f"{row['method']:<11} eps {eps:<4} seed {row['seed']}{label}: "
        f"accuracy {row['test_accuracy']:.4f} loss {row['test_loss']:.3f} "
        f"({row['seconds']:.1f} s)"
    )


# ------------------------------------------------------------------------------ harness
def noise_multiplier(cfg: BenchConfig, epsilon: float) -> float:
    """``sigma`` for ``epsilon`` at ``(q = batch_size / N, steps, delta)`` with the accountant."""
    q = cfg.batch_size / load_task(cfg.task).train_size
    return calibrate_noise_multiplier(
        epsilon, cfg.delta, q, steps=cfg.steps, accountant=cfg.accountant
    )


def _run_jobs(jobs: list[_Job], world: int, verbose: bool) -> list[dict[str, Any]]:
    """Opacus jobs in this process, the others on one set of ranks per target epsilon (so that
    the ledgers' cached accounting of one noise multiplier is shared by its runs)."""
    rows: list[dict[str, Any]] = []
    distributed = [job for job in jobs if job.method != "opacus"]
    for epsilon in dict.fromkeys(job.epsilon for job in distributed):
        rows += _launch([job for job in distributed if job.epsilon == epsilon], world, verbose)
    for job in jobs:
        if job.method == "opacus":
            rows.append(_opacus_row(job, load_task(job.config.task)))
            if verbose:
                print(describe_row(rows[-1]), file=sys.stderr, flush=True)
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
    epsilon uses the same noise multiplier, calibrated for it. A row holds ``task``, ``method``,
    ``seed``, ``epsilon_target``, ``epsilon`` (spent, from the run's ledger or Opacus's
    accountant, at ``config.delta``), ``noise_multiplier``, ``sample_rate``, ``test_accuracy``,
    ``test_loss`` (mean cross-entropy, nats), ``bytes_per_step`` (sent per rank), ``steps``,
    ``seconds`` and ``label`` (empty here; the sweep names its setting there).
    """
    cfg = config or BenchConfig()
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    sigmas = {epsilon: noise_multiplier(cfg, epsilon) for epsilon in epsilons}
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
    settings (label ``"base"``; by default each method at its tuned optimizer) and at each
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
        sigma = noise_multiplier(cfg, epsilon)
        jobs += [
            _Job(m, s, cfg, label=label)
            if m == "nonprivate"
            else _Job(m, s, cfg, epsilon, sigma, label)
            for m in names
            for s in seeds
        ]
    return _run_jobs(jobs, base.world, verbose)
