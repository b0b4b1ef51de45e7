r"""Choosing the noise multiplier before training, and stating the plan.

A plan is a noise multiplier σ, a sample rate `q` and a number of steps
`T` of the Poisson subsampled Gaussian mechanism. For a fixed δ, an Opacus
accountant maps the plan to the ε of the `(ε, δ)`-DP
guarantee that the whole run gives each unit of privacy (add/remove-one adjacency).
[`calibrate_noise_multiplier()`][sketchcomm.privacy.calibration.calibrate_noise_multiplier] inverts
that map with Opacus's ``get_noise_multiplier``: it returns the σ whose ε is at
most the target and within the tolerance of it.
"""

from __future__ import annotations

import math
import warnings

from opacus.accountants.utils import get_noise_multiplier

from sketchcomm.privacy.accounting import (
    ACCOUNTANT_DESCRIPTIONS,
    check_accountant,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    epsilon_for_history,
)
from sketchcomm.privacy.mechanism import (
    check_threat_model,
    outsider_noise_multiplier,
    resolve_colluding_ranks,
)
from sketchcomm.validation import check_positive_float, check_positive_int

__all__ = ["calibrate_noise_multiplier", "describe_plan", "plan_epsilon", "steps_for_epochs"]


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    r"""Number of steps in ``epochs`` passes at sample rate `q`:
    `⌊epochs / q⌋`, as Opacus counts them."""
    q = check_sample_rate(sample_rate)
    passes = check_positive_float("epochs", epochs)
    return check_positive_int("steps (epochs / sample_rate)", int(passes / q))


def _resolve_steps(steps: int | None, epochs: float | None, sample_rate: float) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if epochs is None:
        return check_positive_int("steps", steps)
    return steps_for_epochs(epochs, sample_rate)


def plan_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
) -> float:
    r"""Return ε of ``steps`` steps with noise multiplier σ and
    sample rate `q`, at ``delta``, as the named Opacus accountant computes it.

    Args:
        noise_multiplier: σ, noise standard deviation over the clipping norm.
        sample_rate: `q`, the probability that a unit is in a step's batch.
        steps: number of steps `T`.
        delta: target δ.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
    """
    return epsilon_for_history(
        accountant,
        [(check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate), steps)],
        delta,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    r"""Return the noise multiplier σ for which ``steps`` steps (or ``epochs``
    epochs) at sample rate `q` are `(ε, δ)`-DP with
    `target - tolerance ≤ ε ≤ target`.

    Binary search by Opacus's ``get_noise_multiplier``; use the same accountant here as for the
    run's [`PrivacyLedger`][sketchcomm.privacy.PrivacyLedger], or the ledger may find the plan over
    budget.

    Args:
        target_epsilon: the ε the whole run may spend.
        delta: target δ.
        sample_rate: `q`, the probability that a unit is in a step's batch.
        steps: number of steps; give this or ``epochs``.
        epochs: number of passes over the data, i.e. ``int(epochs / sample_rate)`` steps.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        epsilon_tolerance: how far below the target the returned plan may land.

    Raises:
        ValueError: on invalid arguments, when no noise multiplier up to Opacus's limit reaches
            the target, or when the accountant's numerics fail during the search.
    """
    check_accountant(accountant)
    delta = check_delta(delta)
    q = check_sample_rate(sample_rate)
    total_steps = _resolve_steps(steps, epochs, q)
    target = check_positive_float("target_epsilon", target_epsilon)
    tolerance = check_positive_float("epsilon_tolerance", epsilon_tolerance)
    if tolerance >= target:
        raise ValueError(
            f"epsilon_tolerance must be below target_epsilon, got {epsilon_tolerance!r} "
            f"for a target of {target_epsilon!r}"
        )
    try:
        with warnings.catch_warnings():
            # The search evaluates very large noise multipliers, for which the RDP accountant
            # warns that its largest order is optimal; that says nothing about the result.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=total_steps,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
    except (ArithmeticError, ValueError) as err:
        raise ValueError(
            f"cannot calibrate the noise multiplier for epsilon={target_epsilon:g}, "
            f"delta={delta:g}, sample_rate={q:g}, steps={total_steps} with the {accountant} "
            f"accountant: {err}"
        ) from err
    return float(sigma)


#: Below this expected signal-to-noise ratio the plan printout warns that noise swamps the signal.
SWAMPED_SIGNAL_TO_NOISE = 1.0


def _threat_model(
    noise_multiplier: float,
    unit: str,
    world_size: int | None,
    colluding_ranks: int | None,
    noise_placement: str,
) -> tuple[int | None, float]:
    """``(t, outsider multiplier)``. Without ``world_size``, ``unit="rank"`` has ``t = W - 1``
    (returned as ``None``) and the outsider multiplier is stated as ``sigma``, a lower bound of
    the true ``sigma sqrt(W)``, so the outsider epsilon is an upper bound."""
    threat_unit = "rank" if unit == "rank" else "example"
    if world_size is None:
        if colluding_ranks not in (None, 0):
            raise ValueError(
                "give world_size with colluding_ranks: the noise shares and the epsilons depend "
                "on the number of ranks"
            )
        return (None if threat_unit == "rank" else 0), noise_multiplier
    t = resolve_colluding_ranks(colluding_ranks, threat_unit, world_size)
    check_threat_model(threat_unit, noise_placement, t, world_size)
    return t, outsider_noise_multiplier(noise_multiplier, world_size, noise_placement, t)


def _epsilon_text(epsilon: float) -> str:
    return f"{epsilon:.4g}" if math.isfinite(epsilon) else "infinite"


def describe_plan(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
    *,
    unit: str = "example",
    budget: float | None = None,
    dataset_size: int | None = None,
    secure_mode: bool | None = None,
    world_size: int | None = None,
    colluding_ranks: int | None = None,
    noise_placement: str = "distributed",
) -> str:
    r"""Return a human-readable statement of a privacy plan, to print before training.

    States the unit of privacy, adjacency, accountant, δ, σ, `q`,
    the number of steps, the threat model, and the ε the accountant expects at
    the end towards outside observers (who face the multiplier of all noise shares,
    [`outsider_noise_multiplier()`][sketchcomm.privacy.mechanism.outsider_noise_multiplier]) and
    towards ``t`` colluding ranks (who remove their own shares and face σ). With the expected
    number of contributions per step (`qN` from ``dataset_size``, or `qW` for ``unit="rank"``) it
    also states the expected signal-to-noise of one step, `qN / σ_{out}`: the norm of the
    summed update when all contributions agree (each clipped to `C`) over the noise standard
    deviation `σ_{out} C` along that direction; below 1 the noise swamps even a unanimous
    gradient, and the printout says so.

    >>> print(describe_plan(2.0, 0.5, 10, 1e-5, "rdp", unit="rank", world_size=2))
    ... # doctest: +ELLIPSIS
    Differential privacy plan
    ...
      signal / noise    : 0.354 ...
    warning: the noise will swamp the signal...

    Args:
        noise_multiplier: the guaranteed σ (what remains after ``t`` colluding ranks
            remove their shares).
        sample_rate: `q`.
        steps: number of steps `T`.
        delta: target δ.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        unit: the unit of privacy, e.g. ``"example"`` or ``"rank"``.
        budget: the ε budget the run will enforce, if any.
        dataset_size: number of units `n`; checks `δ < 1/n`.
        secure_mode: whether the noise comes from the operating system's CSPRNG.
        world_size: number of ranks `W`.
        colluding_ranks: ``t``; ``None`` for the unit's default (0 for examples, ``W - 1`` for
            ranks).
        noise_placement: ``"distributed"`` or ``"single"``.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    total_steps = check_positive_int("steps", steps)
    delta = check_delta(delta, dataset_size)
    t, outsider_sigma = _threat_model(sigma, unit, world_size, colluding_ranks, noise_placement)
    epsilon = plan_epsilon(sigma, q, total_steps, delta, accountant)
    outsider_epsilon = plan_epsilon(outsider_sigma, q, total_steps, delta, accountant)
    delta_line = f"{delta:g}"
    if dataset_size is not None:
        delta_line += f"  (dataset of {dataset_size} {unit}s; 1/n = {1.0 / dataset_size:.3g})"
    ranks = "" if world_size is None else f" of W = {world_size}"
    t_text = (
        "W - 1 (every other rank; give world_size for the outsider epsilon)" if t is None else t
    )
    lines = [
        "Differential privacy plan",
        f"  unit of privacy   : one {unit} (add/remove-one adjacency, Poisson sampling)",
        f"  accountant        : {accountant}, {ACCOUNTANT_DESCRIPTIONS[accountant]}",
        f"  delta             : {delta_line}",
        f"  noise multiplier  : {sigma:g} guaranteed, {outsider_sigma:.4g} towards outsiders "
        "(noise std / clipping norm)",
        f"  sample rate q     : {q:g}  (about {total_steps * q:.3g} epochs)",
        f"  steps             : {total_steps}",
        f"  threat model      : t = {t_text} colluding rank(s){ranks}, noise placement "
        f"{noise_placement}",
        f"  epsilon, outsiders: {_epsilon_text(outsider_epsilon)}  at delta = {delta:g} "
        "(observers of the models and the summed tables)",
        f"  epsilon, t ranks  : {_epsilon_text(epsilon)}  at delta = {delta:g} "
        + (
            "(t = 0: the ranks are trusted)"
            if t == 0
            else f"(any {t_text} colluding ranks that remove their own noise shares, and outsiders)"
        ),
    ]
    if world_size is not None and t is not None and t < world_size - 1:
        share = 0.0 if noise_placement == "single" else sigma / math.sqrt(world_size - t)
        exposed = share * math.sqrt(world_size - t - 1)
        for who, multiplier in (
            (f"{t + 1} colluding rank(s)", exposed),
            ("a rank reading the allreduce's messages (single tables, one share)", share),
        ):
            epsilon_exposed = plan_epsilon(multiplier, q, total_steps, delta, accountant)
            lines.append(
                f"  not covered       : {who}: multiplier {multiplier:.4g}, epsilon "
                f"{_epsilon_text(epsilon_exposed)}"
            )
    if budget is not None:
        verdict = (
            "within budget"
            if epsilon <= budget
            else "over budget: the ledger will refuse steps before the last one"
        )
        lines.append(f"  epsilon budget    : {budget:g} on the guaranteed epsilon  ({verdict})")
    if secure_mode is not None:
        source = (
            "the operating system's CSPRNG (os.urandom), 4 summed Gaussian draws per cell"
            if secure_mode
            else "torch.Generator (Mersenne Twister) seeded from the operating system; not "
            "cryptographically secure"
        )
        lines.append(f"  noise source      : {source}")
    contributions = None
    if unit == "rank" and world_size is not None:
        contributions, label = q * world_size, "qW"
    elif unit != "rank" and dataset_size is not None:
        contributions, label = q * dataset_size, "qN"
    warning = None
    if contributions is not None:
        ratio = contributions / outsider_sigma if outsider_sigma > 0 else math.inf
        lines.append(
            f"  signal / noise    : {ratio:.3g}  (expected contributions {label} = "
            f"{contributions:.4g}, each clipped to C, over the noise std {outsider_sigma:.4g} C "
            "along their common direction: the best case of one step)"
        )
        if ratio < SWAMPED_SIGNAL_TO_NOISE:
            warning = (
                "warning: the noise will swamp the signal: even when every contribution of a "
                "step points the same way, its sum is smaller than the noise along that "
                "direction, and training is likely not to learn. Raise the expected number of "
                "contributions per step (larger batches, more ranks for unit='rank') or the "
                "target epsilon."
            )
    if t == 0:
        guarantee = "towards outside observers of the models and the summed tables, with the "
        guarantee += "ranks trusted (t = 0)"
    else:
        guarantee = (
            f"towards outside observers and any {t_text} colluding rank(s), and "
            f"({_epsilon_text(outsider_epsilon)}, {delta:g})-DP towards outside observers only"
        )
    lines.append(
        f"The run is expected to be ({_epsilon_text(epsilon)}, {delta:g})-DP for each {unit} "
        f"{guarantee}, provided every released step is the clipped, noised update accounted "
        "here. Sketching or compression of the noised update is post-processing and adds no "
        "privacy of its own."
    )
    if warning:
        lines.append(warning)
    return "\n".join(lines)
