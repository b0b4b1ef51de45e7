r"""Statistics of an empirical privacy audit: from the scores of a distinguishing test to a lower
bound on epsilon with a stated confidence.

An `(ε, δ)`-DP mechanism ``M`` constrains every test that tries to tell
``M(D)`` from ``M(D')`` for neighbouring ``D``, ``D'`` (Kairouz, Oh and Viswanath 2015): with
false-positive rate ``FPR`` (the test says ``D'`` on ``D``) and false-negative rate ``FNR``,

.. math::

    FPR + e^{\varepsilon} FNR \ge 1 - \delta, \qquad FNR + e^{\varepsilon} FPR \ge 1 - \delta.

Given upper confidence bounds ``FPR_hi`` and ``FNR_hi`` that hold together with probability at
least ``1 - alpha``, the mechanism can only be `(ε, δ)`-DP if

.. math::

    \varepsilon \ge \varepsilon_{lb} = \max\Big(
        \log\frac{1 - \delta - FPR_{hi}}{FNR_{hi}},
        \log\frac{1 - \delta - FNR_{hi}}{FPR_{hi}}, 0\Big),

so a run whose claimed epsilon is below `ε_{lb}` is refuted at confidence
``1 - alpha`` (Jagielski, Ullman and Oprea, NeurIPS 2020; Nasr et al., IEEE S&P 2021). The two
rates are bounded with one-sided Clopper-Pearson bounds at level ``alpha / 2`` each (a union bound
over the two). The test is a threshold on a score; choosing the threshold on the same trials that
bound its rates would bias the bound upwards, so
[`select_threshold()`][sketchcomm.privacy.audit_stats.select_threshold] picks it on one half of the
trials and [`evaluate_threshold()`][sketchcomm.privacy.audit_stats.evaluate_threshold] bounds the
rates on the other half.

[`expected_lower_bound()`][sketchcomm.privacy.audit_stats.expected_lower_bound] and
[`trials_to_exceed()`][sketchcomm.privacy.audit_stats.trials_to_exceed] predict what the audit can
reach when the scores are Gaussian with a known shift (the Gaussian mechanism, projected on the
canary), which says how many trials it takes to detect a given shortfall of noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betaincinv
from scipy.stats import norm

__all__ = [
    "ThresholdTest",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "evaluate_threshold",
    "expected_lower_bound",
    "select_threshold",
    "trials_to_exceed",
]


def clopper_pearson_upper(
    successes: np.ndarray | int, trials: np.ndarray | int, alpha: float
) -> np.ndarray:
    r"""One-sided Clopper-Pearson upper bound ``p_hi`` of a binomial proportion.

    ``p_hi`` is the ``p`` at which seeing at most ``successes`` in ``trials`` has probability
    exactly ``alpha``, i.e. the ``1 - alpha`` quantile of ``Beta(k + 1, n - k)``, and 1 when
    ``k = n``; ``P(p <= p_hi) >= 1 - alpha`` for every true ``p``. Vectorised over arrays.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials and trials >= 1")
    inside = k < n
    upper = np.ones(np.broadcast(k, n).shape)
    safe_b = np.where(inside, n - k, 1.0)
    return np.where(inside, betaincinv(k + 1.0, safe_b, 1.0 - alpha), upper)


def epsilon_lower_bound(
    false_positives: np.ndarray | int,
    negatives: int,
    false_negatives: np.ndarray | int,
    positives: int,
    delta: float,
    confidence: float,
) -> np.ndarray:
    r"""`ε_{lb}` (module docstring) from the error counts of one or more tests.

    Args:
        false_positives: trials without the canary that the test flagged, out of ``negatives``.
        negatives: trials without the canary.
        false_negatives: trials with the canary that the test missed, out of ``positives``.
        positives: trials with the canary.
        delta: the claimed delta.
        confidence: ``1 - alpha``; each rate gets a one-sided bound at level ``alpha / 2``.

    Returns:
        the bound (0 when the test shows nothing), shaped like the broadcast counts.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    alpha = (1.0 - confidence) / 2.0
    fpr_hi = clopper_pearson_upper(false_positives, negatives, alpha)
    fnr_hi = clopper_pearson_upper(false_negatives, positives, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.clip(1.0 - delta - fpr_hi, 0.0, None) / fnr_hi)
        two = np.log(np.clip(1.0 - delta - fnr_hi, 0.0, None) / fpr_hi)
    return np.maximum(np.maximum(one, two), 0.0)


@dataclass(frozen=True)
class ThresholdTest:
    """The test "the canary was included when the score exceeds ``threshold``", evaluated on
    ``negatives`` trials without and ``positives`` trials with the canary."""

    threshold: float
    negatives: int
    positives: int
    false_positives: int
    false_negatives: int
    fpr_upper: float
    fnr_upper: float
    epsilon_lower_bound: float

    @property
    def fpr(self) -> float:
        return self.false_positives / self.negatives

    @property
    def fnr(self) -> float:
        return self.false_negatives / self.positives


def _errors_at(
    scores_out: np.ndarray, scores_in: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """False positives (``out > t``) and false negatives (``in <= t``) at every threshold."""
    out, inside = np.sort(scores_out), np.sort(scores_in)
    false_positives = len(out) - np.searchsorted(out, thresholds, side="right")
    false_negatives = np.searchsorted(inside, thresholds, side="right")
    return false_positives, false_negatives


def select_threshold(
    scores_out: np.ndarray, scores_in: np.ndarray, delta: float, confidence: float
) -> float:
    """The threshold, among the observed scores, whose bound on these trials is largest.

    Use it on trials that
    [`evaluate_threshold()`][sketchcomm.privacy.audit_stats.evaluate_threshold] will not see.
    """
    candidates = np.unique(np.concatenate([scores_out, scores_in]))
    fp, fn = _errors_at(scores_out, scores_in, candidates)
    bounds = epsilon_lower_bound(fp, len(scores_out), fn, len(scores_in), delta, confidence)
    return float(candidates[int(np.argmax(bounds))])


def evaluate_threshold(
    scores_out: np.ndarray,
    scores_in: np.ndarray,
    threshold: float,
    delta: float,
    confidence: float,
) -> ThresholdTest:
    """Error counts, Clopper-Pearson upper bounds and `ε_lb` of one threshold
    on trials not used to choose it."""
    if len(scores_out) < 1 or len(scores_in) < 1:
        raise ValueError("need at least one trial with and one without the canary")
    fp, fn = _errors_at(scores_out, scores_in, np.array([threshold]))
    alpha = (1.0 - confidence) / 2.0
    n_out, n_in = len(scores_out), len(scores_in)
    bound = epsilon_lower_bound(fp[0], n_out, fn[0], n_in, delta, confidence)
    return ThresholdTest(
        threshold=threshold,
        negatives=n_out,
        positives=n_in,
        false_positives=int(fp[0]),
        false_negatives=int(fn[0]),
        fpr_upper=float(clopper_pearson_upper(fp[0], n_out, alpha)),
        fnr_upper=float(clopper_pearson_upper(fn[0], n_in, alpha)),
        epsilon_lower_bound=float(bound),
    )


def expected_lower_bound(shift: float, per_side: int, delta: float, confidence: float) -> float:
    r"""The bound a threshold test reaches with ``per_side`` evaluation trials on each side when
    the score is ``N(0, 1)`` without and ``N(shift, 1)`` with the canary, taking the expected
    error counts at every threshold (``shift = inf``: perfectly separated scores).

    For the Gaussian mechanism with noise multiplier ``sigma`` and a canary at the clipping norm,
    ``shift = 1 / sigma``.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift!r}")
    if math.isinf(shift):
        return float(epsilon_lower_bound(0, per_side, 0, per_side, delta, confidence))
    thresholds = np.linspace(-3.0, shift + 12.0, 3001)
    fp = np.rint(per_side * norm.sf(thresholds))
    fn = np.rint(per_side * norm.cdf(thresholds - shift))
    return float(np.max(epsilon_lower_bound(fp, per_side, fn, per_side, delta, confidence)))


def trials_to_exceed(
    shift: float, claim: float, delta: float, confidence: float, max_trials: int = 10**9
) -> int | None:
    """The number of trials (selection and evaluation halves, each balanced) at which
    [`expected_lower_bound()`][sketchcomm.privacy.audit_stats.expected_lower_bound] first exceeds
    ``claim``, to within 5%; None beyond
    ``max_trials``."""

    def exceeds(trials: int) -> bool:
        return expected_lower_bound(shift, trials // 4, delta, confidence) > claim

    high = 16
    while not exceeds(high):
        high *= 2
        if high > max_trials:
            return None
    low = high // 2
    while high - low > max(4, high // 20):
        middle = (low + high) // 2
        low, high = (low, middle) if exceeds(middle) else (middle, high)
    return high
