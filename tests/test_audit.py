"""The empirical privacy audit: Clopper-Pearson bounds against scipy and exact binomial tails,
the epsilon lower bound against closed forms, and the audit of the real private hook on gloo
processes (with the calibrated noise the bound stays below the ledger's claim; without noise it
exceeds it)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import beta

from sketchcomm.cli import main
from sketchcomm.privacy.audit import AuditConfig, claimed_epsilon, run_audits, trial_schedule
from sketchcomm.privacy.audit_stats import (
    clopper_pearson_upper,
    epsilon_lower_bound,
    evaluate_threshold,
    expected_lower_bound,
    select_threshold,
    trials_to_exceed,
)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (9, 10), (17, 200), (150, 200)])
def test_clopper_pearson_upper_matches_scipy_and_its_definition(k: int, n: int) -> None:
    alpha = 0.025
    upper = float(clopper_pearson_upper(k, n, alpha))
    assert upper == pytest.approx(beta.ppf(1 - alpha, k + 1, n - k), rel=1e-10)
    # Defining property: at p = upper, seeing at most k successes has probability alpha.
    assert _binomial_cdf(k, n, upper) == pytest.approx(alpha, rel=1e-8)


def test_clopper_pearson_upper_closed_forms_and_vectorisation() -> None:
    n, alpha = 1000, 0.025
    assert float(clopper_pearson_upper(0, n, alpha)) == pytest.approx(1 - alpha ** (1 / n))
    assert float(clopper_pearson_upper(n, n, alpha)) == 1.0
    ks = np.array([0, 5, 50])
    expected = [float(clopper_pearson_upper(int(k), n, alpha)) for k in ks]
    np.testing.assert_allclose(clopper_pearson_upper(ks, n, alpha), expected)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_upper(1, 10, 1.5)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_upper(11, 10, 0.05)


def test_epsilon_lower_bound_closed_forms() -> None:
    n, delta, confidence = 500, 1e-5, 0.95
    u = 1 - ((1 - confidence) / 2) ** (1 / n)  # upper bound of a rate with no errors
    perfect = float(epsilon_lower_bound(0, n, 0, n, delta, confidence))
    assert perfect == pytest.approx(math.log((1 - delta - u) / u), rel=1e-12)
    # A coin flip distinguishes nothing.
    assert float(epsilon_lower_bound(n // 2, n, n // 2, n, delta, confidence)) == 0.0
    # The bound is the larger of the two directions: few false positives, many false negatives.
    fp_hi = float(clopper_pearson_upper(2, n, 0.025))
    fn_hi = float(clopper_pearson_upper(300, n, 0.025))
    expected = max(math.log((1 - delta - fn_hi) / fp_hi), math.log((1 - delta - fp_hi) / fn_hi))
    assert float(epsilon_lower_bound(2, n, 300, n, delta, confidence)) == pytest.approx(expected)


def test_threshold_selection_and_evaluation_count_errors() -> None:
    rng = np.random.default_rng(0)
    out, inside = rng.normal(0, 1, 400), rng.normal(3, 1, 400)
    threshold = select_threshold(out, inside, 1e-5, 0.95)
    test = evaluate_threshold(out, inside, threshold, 1e-5, 0.95)
    assert test.false_positives == int((out > threshold).sum())
    assert test.false_negatives == int((inside <= threshold).sum())
    assert test.epsilon_lower_bound == pytest.approx(
        float(epsilon_lower_bound(test.false_positives, 400, test.false_negatives, 400, 1e-5, 0.95))
    )


def test_power_analysis_is_consistent() -> None:
    claim, delta, confidence = 4.387, 1e-5, 0.95
    perfect = expected_lower_bound(math.inf, 1000, delta, confidence)
    assert perfect == pytest.approx(float(epsilon_lower_bound(0, 1000, 0, 1000, delta, confidence)))
    needed = trials_to_exceed(2.0, claim, delta, confidence)
    assert needed is not None
    assert expected_lower_bound(2.0, needed // 4, delta, confidence) > claim
    assert expected_lower_bound(2.0, int(needed * 0.9) // 4, delta, confidence) <= claim
    # The Gaussian mechanism at the claimed noise never exceeds its own (prv) claim.
    assert trials_to_exceed(1.0, claim, delta, confidence, max_trials=10**7) is None


def test_trial_schedule_balances_both_halves() -> None:
    schedule = trial_schedule(1001, seed=3)
    assert schedule[:500].sum() == 250
    assert schedule[500:].sum() == 251  # 501 evaluation trials: 250 without, 251 with
    assert not np.array_equal(schedule, trial_schedule(1001, seed=4))


def test_audit_config_names_bad_parameters() -> None:
    for name, value in [("trials", 3), ("confidence", 1.0), ("noise_scale", 1.5), ("world", 0)]:
        with pytest.raises(ValueError, match=name):
            AuditConfig(**{name: value})
    with pytest.raises(ValueError, match="delta"):
        AuditConfig(delta=0.2)


def test_claim_is_the_ledger_epsilon_of_one_step() -> None:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.3, sample_rate=1.0)
    config = AuditConfig(noise_multiplier=1.3, accountant="rdp")
    assert claimed_epsilon(config) == pytest.approx(accountant.get_epsilon(1e-5))


@pytest.mark.slow
def test_audit_with_noise_stays_below_the_claim_on_two_ranks() -> None:
    """Two gloo ranks, each adding its share of the noise: the scores have the Gaussian
    mechanism's shift (1 C) and spread (sigma C), and the bound does not refute the claim."""
    config = AuditConfig(trials=1200, world=2, noise_multiplier=1.0)
    (result,) = run_audits([config])
    assert result.table_shapes == ((1, 47),)  # a compressed one-row table of the 1024 parameters
    assert result.claimed_epsilon == pytest.approx(result.ledger_epsilon)
    assert result.score_std == pytest.approx(1.0, rel=0.15)  # 600 draws: 5 standard errors
    assert result.score_shift == pytest.approx(1.0, abs=0.3)  # 5 standard errors
    assert result.test.epsilon_lower_bound <= result.claimed_epsilon
    assert not result.violated


@pytest.mark.slow
def test_audit_command_detects_missing_noise(tmp_path, capsys) -> None:
    """No noise in the hook while claiming sigma = 1: the scores separate perfectly and the
    bound from 800 evaluation trials exceeds the claim (exit status 1)."""
    path = tmp_path / "audit.json"
    status = main(["audit", "--trials", "1600", "--noise-scale", "0", "--json", str(path)])
    assert status == 1
    assert "VIOLATION" in capsys.readouterr().out
    (report,) = json.loads(path.read_text())
    assert report["test"]["false_positives"] == report["test"]["false_negatives"] == 0
    assert report["score_std"] == 0.0
    assert report["ledger_epsilon"] == "inf"  # the ledger of the noiseless hook does not claim
    assert report["epsilon_lower_bound"] > report["claimed_epsilon"]
    assert report["epsilon_lower_bound"] == pytest.approx(
        float(epsilon_lower_bound(0, 400, 0, 400, 1e-5, 0.95))
    )


def test_audit_command_refuses_bad_input(capsys) -> None:
    assert main(["audit", "--trials", "3"]) == 2
    assert "trials" in capsys.readouterr().err
