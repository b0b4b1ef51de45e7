"""Settings of the privacy benchmark: its methods, each task's defaults and tuned optimizers.

See :mod:`benchmarks.privacy` for what each method does and
:mod:`benchmarks.privacy_tasks` for the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from benchmarks.privacy_tasks import TASKS

__all__ = ["METHODS", "TASK_DEFAULTS", "TUNED", "BenchConfig"]

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

#: Per task, the (learning rate, momentum) of each method: the best test accuracy at epsilon 4
#: (mean over seeds 100 and 101 for digits, seed 100 for text; ties broken by the test loss) on an
#: lr x momentum grid of :func:`~benchmarks.privacy_runner.run_sweep` (see
#: docs/privacy-benchmark.md); ``opacus`` takes ``dpsgd``'s.
TUNED: dict[str, dict[str, tuple[float, float]]] = {
    "digits": {
        "nonprivate": (1.0, 0.0),
        "sketch": (1.0, 0.5),
        "dpsgd": (0.5, 0.0),
        "opacus": (0.5, 0.0),
        "sep-sketch": (0.25, 0.5),
        "sep-topk": (0.5, 0.0),
        "sep-randk": (0.1, 0.0),
        "sep-topk-local": (0.5, 0.0),
    },
    "text": {
        "nonprivate": (2.0, 0.5),
        "sketch": (4.0, 0.0),
        "dpsgd": (1.0, 0.5),
        "opacus": (1.0, 0.5),
        "sep-sketch": (0.25, 0.5),
        "sep-topk": (1.0, 0.5),
        "sep-randk": (0.5, 0.0),
        "sep-topk-local": (1.0, 0.0),
    },
}

#: Per task, the settings that differ from :class:`BenchConfig`'s defaults (the digits task's).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {},
    "text": {"steps": 128, "batch_size": 64, "hidden": 64},
}


@dataclass(frozen=True)
class BenchConfig:
    """Training settings shared by every method.

    Attributes:
        task: ``"digits"`` or ``"text"`` (:data:`~benchmarks.privacy_tasks.TASKS`).
        steps: optimizer steps ``T``.
        batch_size: expected global batch ``q N``; the sample rate is ``q = batch_size / N``.
        lr: SGD learning rate of every method (the private updates are the clipped, noised sum
            divided by ``q N``); None for each method's value in :data:`TUNED`.
        max_grad_norm: clipping norm ``C`` of one example's gradient (or table), all buckets.
        hidden: hidden width of the MLP.
        compression: bucket elements per table element of the sketch (and byte budget of the
            separate-noise baselines).
        topk_fraction: coordinates recovered per step by FetchSGD, as a fraction of the bucket.
        momentum: momentum ``rho`` of every method (applied where each method keeps it); None
            for each method's value in :data:`TUNED`.
        delta: the ``delta`` of every epsilon; below ``1 / N``.
        accountant: Opacus accountant for calibration and ledgers: ``"rdp"``, ``"prv"``, ``"gdp"``.
        world: number of ranks (gloo processes).
        colluding_ranks: ``t``, the ranks that may pool their noise shares against the others:
            every rank of the hook methods adds ``sigma^2 C^2 / (W - t)`` per cell, so that the
            stated epsilon holds towards them too (``opacus`` runs in one process: no ranks).
        sampling_seed: seed of the Poisson sampling, for reproducible runs only. ``None`` (the
            default) draws every sampler's seed from the operating system's randomness, as the
            demo does: the amplification by subsampling behind every epsilon assumes that no one
            can tell which examples a step used. With a seed the run is **not private**, and its
            JSON and tables say so (:attr:`private`).
    """

    task: str = "digits"
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
    colluding_ranks: int = 0
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {self.task!r}")

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> BenchConfig:
        """The defaults of ``task`` (:data:`TASK_DEFAULTS`), with ``overrides`` (None values are
        ignored, so that unset command-line options keep the task's defaults)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown settings {unknown}; choose from {sorted(names)}")
        given = {name: value for name, value in overrides.items() if value is not None}
        return cls(**{**TASK_DEFAULTS[task], **given, "task": task})

    @property
    def private(self) -> bool:
        """Whether the stated epsilons can hold: the Poisson sampling is secret (not seeded)."""
        return self.sampling_seed is None

    def sampling(self) -> str:
        """One sentence on how the batches are drawn, naming a run that is not private."""
        if self.private:
            return "Poisson sampling seeded from the operating system's randomness"
        return (
            f"NOT PRIVATE: Poisson sampling seeded by --sampling-seed {self.sampling_seed}, so "
            "the batches are reproducible and the amplification by subsampling behind the "
            "epsilons does not hold"
        )

    def optimizer(self, method: str) -> tuple[float, float]:
        """``(learning rate, momentum)`` of ``method``."""
        lr, momentum = TUNED[self.task][method]
        return (
            lr if self.lr is None else self.lr,
            momentum if self.momentum is None else self.momentum,
        )
