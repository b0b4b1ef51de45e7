r"""Choosing the noise multiplier before training, and stating the plan.

A plan is a noise multiplier :math:`\sigma`, a sample rate :math:`q` and a number of steps
:math:`T` of the Poisson subsampled Gaussian mechanism. For a fixed :math:`\delta`, an Opacus
accountant maps the plan to the :math:`\varepsilon` of the :math:`(\varepsilon, \delta)`-DP
guarantee that the whole run gives each unit of privacy (add/remove-one adjacency).
:func:`calibrate_noise_multiplier` inverts that map with Opacus's ``get_noise_multiplier``:
it returns the :math:`\sigma` whose :math:`\varepsilon` is at most the target and within the
tolerance of it.
"""

from __future__ import annotations

import warnings

from opacus.accountants.utils import get_noise_multiplier

from sketchcomm.privacy.accounting import (
    ACCOUNTANT_DESCRIPTIONS,
    check_accountant,
    check_delta,
    check_noise_multiplier,
    check_positive_float,
    check_positive_int,
    check_sample_rate,
    epsilon_for_history,
)

__all__ = ["calibrate_noise_multiplier", "describe_plan", "plan_epsilon", "steps_for_epochs"]


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    r"""Number of steps in ``epochs`` passes at sample rate :math:`q`:
    :math:`\lfloor \text{epochs} / q \rfloor`, as Opacus counts them."""
    q = check_sample_rate(sample_rate)
    passes = check_positive_float(epochs, "epochs")
    return check_positive_int(int(passes / q), "steps (epochs / sample_rate)")


def _resolve_steps(steps: int | None, epochs: float | None, sample_rate: float) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if epochs is None:
        return check_positive_int(steps, "steps")
    return steps_for_epochs(epochs, sample_rate)


def plan_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
) -> float:
    r"""Return :math:`\varepsilon` of ``steps`` steps with noise multiplier :math:`\sigma` and
    sample rate :math:`q`, at ``delta``, as the named Opacus accountant computes it.

    Args:
        noise_multiplier: :math:`\sigma`, noise standard deviation over the clipping norm.
        sample_rate: :math:`q`, the probability that a unit is in a step's batch.
        steps: number of steps :math:`T`.
        delta: target :math:`\delta`.
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
    r"""Return the noise multiplier :math:`\sigma` for which ``steps`` steps (or ``epochs``
    epochs) at sample rate :math:`q` are :math:`(\varepsilon, \delta)`-DP with
    :math:`\text{target} - \text{tolerance} \le \varepsilon \le \text{target}`.

    Binary search by Opacus's ``get_noise_multiplier``; use the same accountant here as for the
    run's :class:`~sketchcomm.privacy.PrivacyLedger`, or the ledger may find the plan over
    budget.

    Args:
        target_epsilon: the :math:`\varepsilon` the whole run may spend.
        delta: target :math:`\delta`.
        sample_rate: :math:`q`, the probability that a unit is in a step's batch.
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
    target = check_positive_float(target_epsilon, "target_epsilon")
    tolerance = check_positive_float(epsilon_tolerance, "epsilon_tolerance")
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
) -> str:
    r"""Return a human-readable statement of a privacy plan, to print before training.

    States the unit of privacy, adjacency, accountant, :math:`\delta`, :math:`\sigma`,
    :math:`q`, the number of steps and the :math:`\varepsilon` the accountant expects at the end.

    Args:
        noise_multiplier: :math:`\sigma`.
        sample_rate: :math:`q`.
        steps: number of steps :math:`T`.
        delta: target :math:`\delta`.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        unit: the unit of privacy, e.g. ``"example"``.
        budget: the :math:`\varepsilon` budget the run will enforce, if any.
        dataset_size: number of units :math:`n`; checks :math:`\delta < 1/n`.
        secure_mode: whether the noise comes from a cryptographically secure generator.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    total_steps = check_positive_int(steps, "steps")
    delta = check_delta(delta, dataset_size)
    epsilon = plan_epsilon(sigma, q, total_steps, delta, accountant)
    delta_line = f"{delta:g}"
    if dataset_size is not None:
        delta_line += f"  (dataset of {dataset_size} {unit}s; 1/n = {1.0 / dataset_size:.3g})"
    lines = [
        "Differential privacy plan",
        f"  unit of privacy   : one {unit} (add/remove-one adjacency, Poisson sampling)",
        f"  accountant        : {accountant}, {ACCOUNTANT_DESCRIPTIONS[accountant]}",
        f"  delta             : {delta_line}",
        f"  noise multiplier  : {sigma:g}  (noise std = sigma x clipping norm)",
        f"  sample rate q     : {q:g}  (about {total_steps * q:.3g} epochs)",
        f"  steps             : {total_steps}",
        f"  expected epsilon  : {epsilon:.4g}  at delta = {delta:g}",
    ]
    if budget is not None:
        verdict = (
            "within budget"
            if epsilon <= budget
            else "over budget: the ledger will refuse steps before the last one"
        )
        lines.append(f"  epsilon budget    : {budget:g}  ({verdict})")
    if secure_mode is not None:
        source = "cryptographically secure" if secure_mode else "standard pseudo-random"
        lines.append(f"  noise source      : {source} generator")
    lines.append(
        f"The run is expected to be ({epsilon:.4g}, {delta:g})-DP for each {unit}, provided every "
        "released step is the clipped, noised update accounted here. Sketching or compression "
        "of the noised update is post-processing and adds no privacy of its own."
    )
    return "\n".join(lines)
