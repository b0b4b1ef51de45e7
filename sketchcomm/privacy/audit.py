r"""Empirical privacy audit of ``DPSketchState`` + ``dp_sketch_hook`` with a canary.

The audit runs the library's real private code path many times and tries to tell whether one
crafted example, the canary, took part (the distinguishing game of Jagielski, Ullman and Oprea,
"Auditing differentially private machine learning: how private is private SGD?", NeurIPS 2020,
and Nasr, Song, Thakurta, Papernot and Carlini, "Adversary instantiation: lower bounds for
differentially private machine learning", IEEE S&P 2021; reimplemented here). Its success rates
give, through [`sketchcomm.privacy.audit_stats`][sketchcomm.privacy.audit_stats], a lower bound on
the epsilon the mechanism really has, to set against the epsilon the ledger claims.

Setup. A DDP model on ``W`` gloo ranks (spawned processes) chosen by the variant
([`sketchcomm.privacy.audit_variants`][sketchcomm.privacy.audit_variants]: one linear layer, a token
model, a model in several buckets, or ``unit="rank"``); the loss is the summed output, so a
contribution's gradient is a known function of its input. Every rank holds ``B`` fixed background
examples (Gaussian); rank 0 also holds the canary in the trials with it (dataset ``D'``) and not in
the others (``D``). The hook is [`DPSketchState`][sketchcomm.privacy.DPSketchState] with sample rate
1 (every contribution is in every step, the canary with certainty), clipping to ``C`` (``C_b`` per
bucket) in sketch space, noise multiplier ``sigma``, one-row tables (``[1, c]``, ``c`` from
``compression``; or an exact ``[1, d_b]`` table uncompressed or for small buckets) and dense
recovery, so the recovered gradient ``g_hat = S^T T / N`` is an invertible function of the released
tables ``T``. Each trial is one step of a fresh run: a fresh ledger records exactly that release.

Score. The canary's clipped tables are known cells; projecting the release on them with the
likelihood-ratio weights ([`audit_variants`][sketchcomm.privacy.audit_variants]) gives a statistic
that is ``N(b, sigma^2)`` without and ``N(b + 1, sigma^2)`` with the canary for the Gaussian
mechanism (``b`` is the background's fixed projection). The best threshold on it is the most
powerful test, and its shift ``1 / sigma`` is what
[`trials_to_exceed()`][sketchcomm.privacy.audit_stats.trials_to_exceed] uses to say how many trials
a detection needs.

Claim. The epsilon claimed for one trial is the ledger's: a
[`PrivacyLedger`][sketchcomm.privacy.PrivacyLedger] with the chosen Opacus accountant and ``delta``,
asked for one step at noise multiplier ``sigma`` and sample rate 1, per example (per rank for the
``rank`` variant), towards an outside observer of the aggregate with the ranks trusted
(``colluding_ranks=0``, the shares ``sigma^2 C^2 / W`` each). To check that the audit catches a
faulty mechanism, ``noise_scale`` configures the hook with ``noise_scale * sigma`` (a
misconfiguration, which the hook's own ledger records), and ``fault`` plants an implementation error
the ledger cannot see ([`audit_faults`][sketchcomm.privacy.audit_faults]: no noise, half the noise,
every bucket clipped to the full ``C``); the claim stays the one for ``sigma``. Honest, the lower
bound must stay at or below the claim; a bound above it refutes the claim at the stated confidence.
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
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.privacy.audit_config import (
    AuditConfig,
    audit_ledger,
    claimed_epsilon,
    predicted_score,
)
from sketchcomm.privacy.audit_faults import FaultyDPSketchState
from sketchcomm.privacy.audit_stats import (
    ThresholdTest,
    evaluate_threshold,
    expected_lower_bound,
    select_threshold,
    trials_to_exceed,
)
from sketchcomm.privacy.audit_variants import VARIANTS

__all__ = [
    "AuditConfig",
    "AuditResult",
    "analyse",
    "claimed_epsilon",
    "predicted_score",
    "run_audits",
    "trial_schedule",
    "write_json",
]


@dataclass(frozen=True)
class AuditResult:
    """What an audit measured and concluded; ``test`` holds the evaluation counts and bounds,
    ``table_shapes`` the released table of every DDP bucket (in bucket order), ``score_shift``
    and ``score_std`` the measured shift of the mean score and its spread without the canary,
    ``predicted_shift`` and ``predicted_std`` what
    [`predicted_score()`][sketchcomm.privacy.audit.predicted_score] expects of them."""

    config: AuditConfig
    claimed_epsilon: float
    ledger_epsilon: float
    table_shapes: tuple[tuple[int, int], ...]
    test: ThresholdTest
    score_shift: float
    score_std: float
    predicted_shift: float
    predicted_std: float
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
            "effective_noise_multiplier": self.config.effective_noise_multiplier,
            "claimed_epsilon": self.claimed_epsilon,
            "ledger_epsilon": _json_number(self.ledger_epsilon),
            "table_shapes": [list(shape) for shape in self.table_shapes],
            "test": test,
            "epsilon_lower_bound": self.test.epsilon_lower_bound,
            "violated": self.violated,
            "score_shift": self.score_shift,
            "score_std": self.score_std,
            "predicted_shift": self.predicted_shift,
            "predicted_std": self.predicted_std,
            "expected_lower_bound": _json_number(self.expected_lower_bound),
            "trials_to_exceed_claim": self.trials_to_exceed_claim,
            "seconds": self.seconds,
        }


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


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
    setup = VARIANTS[config.variant].build(config, rank)
    schedule = trial_schedule(config.trials, config.seed)
    model = DDP(setup.model, bucket_cap_mb=setup.bucket_cap_mb)
    compressed = config.compression > 1.0
    state = FaultyDPSketchState(
        audit_ledger(config),
        max_grad_norm=config.max_grad_norm,
        unit=config.unit,
        sample_rate=1.0,
        dataset_size=config.dataset_size if config.unit == "example" else None,
        noise_multiplier=config.configured_noise_multiplier,
        fault=config.fault,
        compression=config.compression if compressed else 2.0,
        rows=1,
        recovery="dense",
        min_compression_size=1 if compressed else 1 << 62,
        seed=config.seed,
        colluding_ranks=0,  # the game is an outside observer's: it sees the aggregate only
    )
    state.register(model)
    parameters = list(model.module.parameters())
    scale = state.normalizer / config.max_grad_norm
    scores = np.empty(config.trials)
    from tqdm import tqdm

    trials = tqdm(schedule, desc="audit trials", unit="trial", disable=rank != 0, mininterval=1.0)
    for trial, included in enumerate(trials):
        state.ledger = audit_ledger(config)  # each trial is the one release of a fresh run
        model.zero_grad(set_to_none=True)
        model(setup.with_canary if included else setup.background).sum().backward()
        score = 0.0
        for probe in setup.probes:
            grad = parameters[probe.parameter].grad
            if grad is None:
                raise RuntimeError("the audited model's backward left a parameter without grad")
            score += probe.weight * grad.flatten()[probe.index].item()
        scores[trial] = score * scale
    shapes = [(s.sketch.rows, s.sketch.columns) for _, s in sorted(state.buckets.items())]
    return {"scores": scores, "table_shapes": shapes, "ledger_epsilon": state.ledger.epsilon}


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
        predicted_shift, predicted_std = predicted_score(config)
        true_shift = math.inf if predicted_std == 0 else predicted_shift / predicted_std
        per_side = (config.trials - config.trials // 2) // 2
        results.append(
            AuditResult(
                config=config,
                claimed_epsilon=claim,
                ledger_epsilon=run["ledger_epsilon"],
                table_shapes=tuple(tuple(shape) for shape in run["table_shapes"]),
                test=test,
                score_shift=shift,
                score_std=std,
                predicted_shift=predicted_shift,
                predicted_std=predicted_std,
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
    """Write the results as a JSON list of
    [`AuditResult.as_dict()`][sketchcomm.privacy.audit.AuditResult.as_dict]."""
    Path(path).write_text(json.dumps([r.as_dict() for r in results], indent=1) + "\n")
