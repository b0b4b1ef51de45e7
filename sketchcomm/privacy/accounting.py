r"""Privacy parameters and their accounting by Opacus: checks of `(ε, δ)`,
noise multiplier and sample rate, and the ε of a history of steps.

A history is the sequence of `(σ, q, n)` triples that Opacus's accountants keep (noise
multiplier, sample rate and number of consecutive identical steps of the Poisson subsampled
Gaussian mechanism). [`epsilon_for_history()`][sketchcomm.privacy.accounting.epsilon_for_history]
hands a history to a real Opacus accountant and returns its ε at a fixed δ;
nothing here computes privacy loss itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from sketchcomm.validation import check_number, check_positive_float, check_positive_int

__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_DESCRIPTIONS",
    "History",
    "HistoryEntry",
    "PrivacyBudgetExceeded",
    "cached_epsilon",
    "check_accountant",
    "check_budget",
    "check_delta",
    "check_noise_multiplier",
    "check_outsider_noise_multiplier",
    "check_sample_rate",
    "epsilon_for_history",
    "history_extends",
    "stepped_history",
]

#: Accountants the ledger accepts, by their Opacus mechanism name.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")

#: One-line description of each accountant, for reports.
ACCOUNTANT_DESCRIPTIONS: dict[str, str] = {
    "rdp": "Rényi DP (Opacus RDPAccountant)",
    "prv": "privacy loss random variables (Opacus PRVAccountant, upper bound)",
    "gdp": "Gaussian DP (Opacus GaussianAccountant; experimental, may underestimate)",
}

HistoryEntry = tuple[float, float, int]
History = tuple[HistoryEntry, ...]


class PrivacyBudgetExceeded(RuntimeError):
    r"""Recording a step would make the spent ε exceed the budget.

    Raised by [`PrivacyLedger.record_step()`][sketchcomm.privacy.PrivacyLedger.record_step] before
    anything is recorded or written: the caller must not release the step's noisy result.

    >>> from sketchcomm.privacy import PrivacyLedger
    >>> ledger = PrivacyLedger("rdp", delta=1e-5, budget=0.5)
    >>> try:
    ...     ledger.record_step(0.5, 0.1)
    ... except PrivacyBudgetExceeded as refused:
    ...     print(refused.spent, refused.would_be > refused.budget, ledger.steps)
    0.0 True 0

    Attributes:
        spent: ε spent before the refused step.
        budget: the ε budget.
        would_be: ε the refused step would have brought.
        delta: the δ all three values are stated for.
        accountant: name of the accountant that computed them.
    """

    def __init__(
        self, *, spent: float, budget: float, would_be: float, delta: float, accountant: str
    ) -> None:
        self.spent = spent
        self.budget = budget
        self.would_be = would_be
        self.delta = delta
        self.accountant = accountant
        super().__init__(
            f"privacy budget exceeded: the step would bring epsilon from {spent:.6g} to "
            f"{would_be:.6g}, above the budget of {budget:.6g} (delta={delta:g}, "
            f"{accountant} accountant); nothing was recorded, do not release the step"
        )


def check_accountant(accountant: Any) -> str:
    """Return ``accountant`` if it names a supported accountant, else raise ValueError."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    return accountant


def check_delta(delta: Any, dataset_size: int | None = None) -> float:
    r"""Return ``delta`` as a float if `0 < δ < 1` (and `δ < 1/n` when the
    dataset size `n` is given), else raise ValueError."""
    value = check_number("delta", delta)
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if dataset_size is not None:
        dataset_size = check_positive_int("dataset_size", dataset_size)
        if value >= 1.0 / dataset_size:
            raise ValueError(
                f"delta must be below 1/dataset_size = {1.0 / dataset_size:.3g} "
                f"(dataset_size={dataset_size}), got {value!r}: a delta of 1/n or more admits "
                "mechanisms that publish one unit's data outright"
            )
    return value


def check_budget(budget: Any) -> float | None:
    """Return ``budget`` as a float (or None) if it is a finite positive epsilon."""
    return None if budget is None else check_positive_float("budget", budget)


def check_noise_multiplier(noise_multiplier: Any) -> float:
    """Return ``noise_multiplier`` as a float if it is finite and >= 0."""
    value = check_number("noise_multiplier", noise_multiplier)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return value


def check_outsider_noise_multiplier(outsider: Any, guaranteed: Any) -> float:
    """The multiplier an outside observer faces (``guaranteed`` when ``outsider`` is ``None``),
    checked to be at least the guaranteed one: colluding ranks remove noise, outsiders do not."""
    guaranteed = check_noise_multiplier(guaranteed)
    if outsider is None:
        return guaranteed
    value = check_noise_multiplier(outsider)
    if value < guaranteed:
        raise ValueError(
            f"outsider_noise_multiplier ({outsider!r}) must be at least the guaranteed "
            f"noise_multiplier ({guaranteed!r}): outside observers face all the noise, "
            "colluding ranks remove their own shares of it"
        )
    return value


def check_sample_rate(sample_rate: Any) -> float:
    """Return ``sample_rate`` as a float if it is in (0, 1]."""
    value = check_number("sample_rate", sample_rate)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return value


def _new_accountant(accountant: str) -> IAccountant:
    # The GDP accountant warns on every construction that it can underestimate the privacy
    # spent; PrivacyLedger repeats that warning once per ledger instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_accountant(mechanism=accountant)


def history_extends(longer: History, shorter: History) -> bool:
    """Whether the steps of ``shorter`` are the first steps of ``longer``."""
    if len(shorter) > len(longer):
        return False
    if not shorter:
        return True
    *body, (sigma, q, count) = shorter
    if tuple(body) != longer[: len(body)]:
        return False
    next_sigma, next_q, next_count = longer[len(body)]
    return (sigma, q) == (next_sigma, next_q) and count <= next_count


def stepped_history(
    accountant: str, history: History, noise_multiplier: float, sample_rate: float, steps: int
) -> History:
    acc = _new_accountant(accountant)
    acc.history = list(history)
    for _ in range(steps):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return tuple(acc.history)


@lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP of one subsampled Gaussian step at every order of ``RDPAccountant``."""
    return rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )


def _rdp_epsilon(delta: float, history: History) -> float:
    r"""``RDPAccountant(history).get_epsilon(delta)``, computed the way Opacus does it (RDP is
    additive: ``compute_rdp(q, sigma, steps=n) = n * compute_rdp(q, sigma, steps=1)``, summed over
    the history, then converted to `(ε, δ)`), with the per-step RDP cached
    per `(σ, q)`: the ledger asks for epsilon at every step, and recomputing the RDP
    of every order costs tens of milliseconds.
    """
    rdp = sum(steps * _rdp_of_one_step(sigma, q) for sigma, q, steps in history)
    epsilon, _ = rdp_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(epsilon)


@lru_cache(maxsize=128)
def cached_epsilon(accountant: str, delta: float, history: History) -> float:
    if not history:
        return 0.0
    if any(noise_multiplier == 0.0 for noise_multiplier, _, _ in history):
        # A step without noise releases its batch exactly: no finite epsilon holds for it.
        return math.inf
    try:
        if accountant == "rdp":
            return _rdp_epsilon(delta, history)
        acc = _new_accountant(accountant)
        acc.history = list(history)
        return float(acc.get_epsilon(delta))
    except (ArithmeticError, ValueError) as err:
        raise ValueError(
            f"the {accountant} accountant could not compute epsilon for delta={delta:g} and "
            f"history {list(history)}: {err}"
        ) from err


def epsilon_for_history(
    accountant: str, history: Sequence[tuple[float, float, int]], delta: float
) -> float:
    r"""Return ε spent by ``history`` at ``delta``, as computed by Opacus.

    Builds the Opacus accountant named ``accountant``, gives it ``history`` (a sequence of
    ``(noise_multiplier, sample_rate, num_steps)``, the layout of Opacus's ``history``) and
    returns its ``get_epsilon(delta)``. An empty history has spent nothing (`0`); a history
    with a noise multiplier of 0 has no finite ε (∞). Results are
    cached per (accountant, delta, history), as the PRV accountant can take seconds on long runs.

    Args:
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        history: the steps, as ``(noise_multiplier, sample_rate, num_steps)``.
        delta: target δ.

    Raises:
        ValueError: on invalid arguments, or when the accountant's numerics fail for them.
    """
    check_accountant(accountant)
    delta = check_delta(delta)
    entries: list[HistoryEntry] = []
    for index, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(
                f"history[{index}] must be (noise_multiplier, sample_rate, num_steps), "
                f"got {entry!r}"
            )
        noise_multiplier, sample_rate, num_steps = entry
        entries.append(
            (
                check_noise_multiplier(noise_multiplier),
                check_sample_rate(sample_rate),
                check_positive_int(f"history[{index}] num_steps", num_steps),
            )
        )
    if accountant == "gdp" and len(entries) > 1:
        raise ValueError(
            "the gdp accountant supports only a constant noise multiplier and sample rate "
            f"(one history entry), got {len(entries)} entries"
        )
    return cached_epsilon(accountant, delta, tuple(entries))
