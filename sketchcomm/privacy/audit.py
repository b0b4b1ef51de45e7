r"""Empirical privacy audit of ``DPSketchState`` + ``dp_sketch_hook`` with a canary.

The audit runs the library's real private code path many times and tries to tell whether one
crafted example, the canary, took part (the distinguishing game of Jagielski, Ullman and Oprea,
"Auditing differentially private machine learning: how private is private SGD?", NeurIPS 2020,
and Nasr, Song, Thakurta, Papernot and Carlini, "Adversary instantiation: lower bounds for
differentially private machine learning", IEEE S&P 2021; reimplemented here). Its success rates
give, through :mod:`sketchcomm.privacy.audit_stats`, a lower bound on the epsilon the mechanism
really has, to set against the epsilon the ledger claims.

Setup. A DDP model ``nn.Linear(d, 1, bias=False)`` on ``W`` gloo ranks (spawned processes); the
loss is the summed output, so example ``x``'s gradient is ``x`` itself. Every rank holds ``B``
fixed background examples (Gaussian, ``[B, d]``); rank 0 also holds the canary ``x_c = 100 C
e_{i*}`` in the trials with the canary (dataset ``D'``) and not in the others (dataset ``D``).
The hook is :class:`~sketchcomm.privacy.DPSketchState` with ``unit="example"``, sample rate 1
(every example is in every step, the canary with certainty), per-example clipping to ``C`` in
sketch space, noise multiplier ``sigma``, one-row tables (``[1, c]``, ``c`` from
``compression``; or an exact ``[1, d]`` table uncompressed) and dense recovery, so the recovered
gradient ``g_hat = S^T T / N`` is an invertible function of the released table ``T``. Each trial is
one step of a fresh run: a fresh ledger records exactly that release.

Score. The canary's clipped table is ``C s(i*) e_{h(i*)}``, a known direction. Projecting the
release on it, ``score = <T, s(i*) e_{h(i*)}> / C = N g_hat[i*] / C``, is the likelihood-ratio
statistic of the Gaussian mechanism: ``N(b, sigma^2)`` without the canary and ``N(b + 1,
sigma^2)`` with it (``b`` is the background's fixed projection). The best threshold on it is the
most powerful test, and its shift ``1 / sigma`` is what :func:`~.audit_stats.trials_to_exceed`
uses to say how many trials a detection needs.

Claim. The epsilon claimed for one trial is the ledger's: a
:class:`~sketchcomm.privacy.PrivacyLedger` with the chosen Opacus accountant and ``delta``,
asked for one step at noise multiplier ``sigma`` and sample rate 1. To check that the audit
catches a faulty mechanism, ``noise_scale`` configures the hook with ``noise_scale * sigma``
while the claim stays the one for ``sigma`` (``noise_scale = 0``: no noise at all). With
``noise_scale = 1`` the lower bound must stay at or below the claim; a bound above it refutes the
claim at the stated confidence.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.privacy import ACCOUNTANTS, DPSketchState, PrivacyLedger
from sketchcomm.privacy.audit_stats import (
    ThresholdTest,
    evaluate_threshold,
    expected_lower_bound,
    select_threshold,
    trials_to_exceed,
)
from sketchcomm.sketch import derive_seed
from sketchcomm.validation import check_choice, check_float, check_int

__all__ = [
    "AuditConfig",
    "AuditResult",
    "analyse",
    "claimed_epsilon",
    "run_audits",
    "trial_schedule",
    "write_json",
]

#: The canary's gradient norm in units of the clipping norm: far above it, so it is clipped to C.
CANARY_SCALE = 100.0


@dataclass(frozen=True)
class AuditConfig:
    """One audit.

    Attributes:
        trials: releases in all, half of them with the canary; the first half of the trials
            chooses the threshold, the second half bounds its error rates.
        noise_multiplier: ``sigma`` of the claim.
        noise_scale: the hook is configured with ``noise_scale * sigma`` (1: honest; 0.5: half
            the noise; 0: none), the claim stays the one for ``sigma``.
        max_grad_norm: clipping norm ``C``.
        compression: bucket elements per table cell (one-row table); 1 for an exact ``[1, d]``
            table (the uncompressed path of the hook).
        delta: the claimed delta.
        accountant: Opacus accountant of the ledger: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        confidence: confidence of the lower bound, in (0, 1).
        world: number of gloo ranks (processes); each adds its share of the noise.
        dim: number of model parameters ``d``.
        background: background examples per rank ``B``.
        seed: seed of the data, the canary's coordinate, the trial order and the hashes (the
            noise itself comes from the operating system, as in training).
    """

    trials: int = 20_000
    noise_multiplier: float = 1.0
    noise_scale: float = 1.0
    max_grad_norm: float = 1.0
    compression: float = 20.0
    delta: float = 1e-5
    accountant: str = "prv"
    confidence: float = 0.95
    world: int = 1
    dim: int = 1024
    background: int = 7
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("trials", self.trials, 8)
        check_float("noise_multiplier", self.noise_multiplier, 0.0, math.inf, open_low=True)
        check_float("noise_scale", self.noise_scale, 0.0, 1.0, open_low=False)
        check_float("max_grad_norm", self.max_grad_norm, 0.0, math.inf, open_low=True)
        check_float("compression", self.compression, 1.0, math.inf, open_low=False)
        check_float("delta", self.delta, 0.0, 1.0, open_low=True)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        check_float("confidence", self.confidence, 0.0, 1.0, open_low=True)
        if self.confidence == 1.0:
            raise ValueError("confidence must be below 1")
        check_int("world", self.world, 1)
        check_int("dim", self.dim, 2)
        check_int("background", self.background, 0)
        check_int("seed", self.seed, 0)
        if self.delta >= 1.0 / self.dataset_size:
            raise ValueError(
                f"delta ({self.delta:g}) must be below 1/dataset size ({self.dataset_size})"
            )

    @property
    def dataset_size(self) -> int:
        """``N = W B + 1``: every rank's background examples and the canary."""
        return self.world * self.background + 1

    @property
    def configured_noise_multiplier(self) -> float:
        return self.noise_scale * self.noise_multiplier


@dataclass(frozen=True)
class AuditResult:
    """What an audit measured and concluded; ``test`` holds the evaluation counts and bounds."""

    config: AuditConfig
    claimed_epsilon: float
    ledger_epsilon: float
    table_shape: tuple[int, int]
    test: ThresholdTest
    score_shift: float
    score_std: float
    expected_lower_bound: float
    trials_to_exceed_claim: int | None
    seconds: float

    @property
    def violated(self) -> bool:
        """Whether the lower bound exceeds the claim: the claim is refuted."""
        return self.test.epsilon_lower_bound > self.claimed_epsilon

    def as_dict(self) -> dict[str, Any]:
        test = asdict(self.test)
        test.update(fpr=self.test.fpr, fnr=self.test.fnr)
        return {
            "config": asdict(self.config),
            "configured_noise_multiplier": self.config.configured_noise_multiplier,
            "claimed_epsilon": self.claimed_epsilon,
            "ledger_epsilon": _json_number(self.ledger_epsilon),
            "table_shape": list(self.table_shape),
            "test": test,
            "epsilon_lower_bound": self.test.epsilon_lower_bound,
            "violated": self.violated,
            "score_shift": self.score_shift,
            "score_std": self.score_std,
            "expected_lower_bound": _json_number(self.expected_lower_bound),
            "trials_to_exceed_claim": self.trials_to_exceed_claim,
            "seconds": self.seconds,
        }


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def claimed_epsilon(config: AuditConfig) -> float:
    """Epsilon a ledger with ``config``'s accountant and delta reports for one step at
    ``config.noise_multiplier`` and sample rate 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Opacus's PRV at q = 1 takes log(0)
        ledger = PrivacyLedger(config.accountant, config.delta, dataset_size=config.dataset_size)
        return ledger.epsilon_after(config.noise_multiplier, 1.0, 1)


def trial_schedule(trials: int, seed: int) -> np.ndarray:
    """Whether each trial includes the canary: each half of the trials (selection, evaluation)
    is balanced and shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    halves = []
    for size in (trials // 2, trials - trials // 2):
        labels = np.arange(size) >= size // 2
        halves.append(rng.permutation(labels))
    return np.concatenate(halves)


# ------------------------------------------------------------------------------ one rank
def _rank_trials(config: AuditConfig, rank: int, world: int) -> dict[str, Any]:
    """Run every trial of ``config`` on this rank; rank 0 returns the scores."""
    generator = torch.Generator().manual_seed(derive_seed("audit background", config.seed, rank))
    background = torch.randn(config.background, config.dim, generator=generator)
    coordinate = derive_seed("audit canary", config.seed) % config.dim
    canary = torch.zeros(1, config.dim)
    canary[0, coordinate] = CANARY_SCALE * config.max_grad_norm
    with_canary = torch.cat([background, canary])
    schedule = trial_schedule(config.trials, config.seed)

    def new_ledger() -> PrivacyLedger:
        return PrivacyLedger(config.accountant, config.delta, dataset_size=config.dataset_size)

    model = DDP(nn.Linear(config.dim, 1, bias=False))
    compressed = config.compression > 1.0
    state = DPSketchState(
        new_ledger(), max_grad_norm=config.max_grad_norm, unit="example", sample_rate=1.0,
        dataset_size=config.dataset_size, noise_multiplier=config.configured_noise_multiplier,
        compression=config.compression if compressed else 2.0, rows=1, recovery="dense",
        min_compression_size=1 if compressed else 1 << 62, seed=config.seed,
    )  # fmt: skip
    state.register(model)
    weight = model.module.weight
    scale = state.normalizer / config.max_grad_norm
    scores = np.empty(config.trials)
    from tqdm import tqdm

    trials = tqdm(schedule, desc="audit trials", unit="trial", disable=rank != 0, mininterval=1.0)
    for trial, included in enumerate(trials):
        state.ledger = new_ledger()  # each trial is the one release of a fresh run
        model.zero_grad(set_to_none=True)
        inputs = with_canary if included and rank == 0 else background
        model(inputs).sum().backward()
        assert weight.grad is not None
        scores[trial] = weight.grad[0, coordinate].item() * scale
    sketch = state.buckets[0].sketch
    return {
        "scores": scores,
        "table_shape": (sketch.rows, sketch.columns),
        "ledger_epsilon": state.ledger.epsilon,
    }


def _rank_main(rank: int, world: int, store: str, configs: list[AuditConfig], out: str) -> None:
    """Entry point of one spawned rank: run every audit in order; rank 0 saves the scores."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        runs = []
        for config in configs:
            start = time.perf_counter()
            run = _rank_trials(config, rank, world)
            run["seconds"] = time.perf_counter() - start
            runs.append(run)
        if rank == 0:
            torch.save(runs, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ analysis
def analyse(config: AuditConfig, scores: np.ndarray) -> tuple[ThresholdTest, float, float]:
    """The threshold test chosen on the first half of the trials and evaluated on the second,
    with the measured shift of the mean score and the standard deviation without the canary."""
    schedule = trial_schedule(config.trials, config.seed)
    half = config.trials // 2
    select, evaluate = slice(0, half), slice(half, None)
    choose_out, choose_in = scores[select][~schedule[select]], scores[select][schedule[select]]
    threshold = select_threshold(choose_out, choose_in, config.delta, config.confidence)
    out, inside = scores[evaluate][~schedule[evaluate]], scores[evaluate][schedule[evaluate]]
    test = evaluate_threshold(out, inside, threshold, config.delta, config.confidence)
    every_out, every_in = scores[~schedule], scores[schedule]
    return test, float(every_in.mean() - every_out.mean()), float(every_out.std(ddof=1))


def run_audits(configs: list[AuditConfig]) -> list[AuditResult]:
    """Run ``configs`` (all with the same ``world``) on freshly spawned gloo ranks, in order."""
    worlds = {config.world for config in configs}
    if len(worlds) != 1:
        raise ValueError(f"the audits of one launch must share world, got {sorted(worlds)}")
    world = worlds.pop()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scores.pt")
        args = (world, os.path.join(tmp, "store"), configs, out)
        mp.spawn(_rank_main, args=args, nprocs=world, join=True)
        runs = torch.load(out, weights_only=False)
    results = []
    for config, run in zip(configs, runs, strict=True):
        claim = claimed_epsilon(config)
        test, shift, std = analyse(config, run["scores"])
        sigma = config.configured_noise_multiplier
        true_shift = math.inf if sigma == 0 else 1.0 / sigma
        per_side = (config.trials - config.trials // 2) // 2
        results.append(
            AuditResult(
                config=config,
                claimed_epsilon=claim,
                ledger_epsilon=run["ledger_epsilon"],
                table_shape=tuple(run["table_shape"]),
                test=test,
                score_shift=shift,
                score_std=std,
                expected_lower_bound=expected_lower_bound(
                    true_shift, per_side, config.delta, config.confidence
                ),
                trials_to_exceed_claim=trials_to_exceed(
                    true_shift, claim, config.delta, config.confidence
                ),
                seconds=run["seconds"],
            )
        )
    return results


def write_json(results: list[AuditResult], path: str | os.PathLike[str]) -> None:
    """Write the results as a JSON list of :meth:`AuditResult.as_dict`."""
    Path(path).write_text(json.dumps([r.as_dict() for r in results], indent=1) + "\n")
