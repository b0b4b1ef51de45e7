"""The audit's variants on real gloo processes: a token model, a model in 36 DDP buckets and
``unit="rank"``. For each, the honest hook gives the Gaussian mechanism's score (shift 1 C,
spread sigma C) and a lower bound at or below the ledger's claim, and a fault planted in the hook
(no noise; every bucket clipped to the full C) is detected: the bound exceeds the claim.

Trial counts come from :func:`~sketchcomm.privacy.audit_stats.trials_to_exceed` at sigma = 2
(claim 2.003, PRV, delta 1e-5): without noise 120 trials separate the scores, so 400 give a
bound near 3.3; a wrong clip split over 36 equal buckets shifts the score by sqrt(36) = 6 C,
three times sigma, which 176 trials detect on average and 800 (expected bound 3.05; below the
claim in none of 1,500 simulated audits of Gaussian scores) reliably. With 16 buckets (shift
2 sigma) 2,000 trials still missed it in 1.3 % of simulated audits.
"""

from __future__ import annotations

import math

import pytest
import torch

from sketchcomm.cli import main
from sketchcomm.privacy.audit import AuditConfig, predicted_score, run_audits
from sketchcomm.privacy.audit_cli import report
from sketchcomm.privacy.audit_stats import epsilon_lower_bound
from sketchcomm.privacy.audit_variants import VARIANTS, BlockLinear

SIGMA = 2.0


def _check_honest(result) -> None:
    """The Gaussian mechanism's score, within 3.5 standard errors (n draws per side at sigma:
    shift's error sigma sqrt(2 / n), the std's relative error sqrt(1 / (2 n)))."""
    per_side = result.config.trials // 2
    assert result.claimed_epsilon == pytest.approx(result.ledger_epsilon)
    assert result.score_shift == pytest.approx(1.0, abs=3.5 * SIGMA * math.sqrt(2 / per_side))
    assert result.score_std == pytest.approx(SIGMA, rel=3.5 * math.sqrt(1 / (2 * per_side)))
    assert result.test.epsilon_lower_bound <= result.claimed_epsilon
    assert not result.violated


def _check_noiseless_detected(result) -> None:
    # The ledger records the configured sigma: it cannot see the fault, the audit does.
    assert result.claimed_epsilon == pytest.approx(result.ledger_epsilon)
    assert result.score_std == 0.0
    assert result.test.false_positives == result.test.false_negatives == 0
    per_side = result.test.negatives
    assert result.test.epsilon_lower_bound == pytest.approx(
        float(epsilon_lower_bound(0, per_side, 0, per_side, 1e-5, 0.95))
    )
    assert result.violated


def test_block_model_is_one_linear_map_in_blocks() -> None:
    model = BlockLinear(12, 3)
    whole = torch.cat([block.weight for block in model.blocks], dim=1)
    inputs = torch.randn(5, 7, 12)
    torch.testing.assert_close(model(inputs), inputs @ whole.T)
    with pytest.raises(ValueError, match="multiple"):
        BlockLinear(10, 3)


def test_predicted_score_of_each_fault() -> None:
    buckets = dict(variant="buckets", dim=16 * 512, buckets=16, noise_multiplier=SIGMA)
    assert predicted_score(AuditConfig(**buckets)) == pytest.approx((1.0, SIGMA))
    assert predicted_score(AuditConfig(**buckets, fault="clip-split")) == pytest.approx((4.0, 2))
    assert predicted_score(AuditConfig(**buckets, fault="half-noise")) == pytest.approx((1.0, 1))
    assert predicted_score(AuditConfig(variant="tokens", fault="no-noise")) == (1.0, 0.0)
    assert AuditConfig(variant="rank", world=3).dataset_size == 3  # the units are the ranks
    assert AuditConfig(variant="rank", world=3).unit == "rank"


def test_variant_data_place_the_canary_on_the_probed_coordinates() -> None:
    """The canary's gradient (rank 0's inputs with it minus without it, through the model) is
    CANARY_SCALE * C on exactly the probed coordinates, in every variant."""
    for name, extra in [("linear", {}), ("tokens", {"tokens": 4}), ("buckets", {"buckets": 4})]:
        config = AuditConfig(variant=name, dim=64, max_grad_norm=0.5, **extra)
        setup = VARIANTS[name].build(config, 0)
        grads = []
        for inputs in (setup.with_canary, setup.background):
            setup.model.zero_grad()
            setup.model(inputs).sum().backward()
            grads.append([p.grad.flatten().clone() for p in setup.model.parameters()])
        for index, (with_it, without) in enumerate(zip(*grads, strict=True)):
            expected = torch.zeros_like(with_it)
            for probe in setup.probes:
                if probe.parameter == index:
                    expected[probe.index] = 100.0 * 0.5
            torch.testing.assert_close(with_it - without, expected, atol=1e-4, rtol=1e-5)
        weights = [probe.weight for probe in setup.probes]
        assert sum(w * w for w in weights) == pytest.approx(1.0)  # sum_b C_b^2 = C^2
    rank0 = VARIANTS["rank"].build(AuditConfig(variant="rank", world=2), 0)
    assert not rank0.background.any()  # absent: rank 0 contributes nothing
    rank1 = VARIANTS["rank"].build(AuditConfig(variant="rank", world=2), 1)
    assert torch.equal(rank1.background, rank1.with_canary)


def test_variant_and_fault_options_name_bad_combinations(capsys) -> None:
    with pytest.raises(ValueError, match="world >= 2"):
        AuditConfig(variant="rank", world=1)
    with pytest.raises(ValueError, match="variant='buckets'"):
        AuditConfig(fault="clip-split")
    with pytest.raises(ValueError, match="multiple of buckets"):
        AuditConfig(variant="buckets", dim=1000, buckets=16)
    assert main(["audit", "--variant", "rank"]) == 2
    assert "world" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--fault", "wrong-split"])


@pytest.mark.slow
def test_token_model_audit_is_per_example_and_detects_missing_noise() -> None:
    """[B, 8, d] inputs, the canary spread over its 8 tokens: honest, the score moves by 1 C
    (one example), not 8 C (one per token); without noise the claim is refuted; with half the
    noise the spread is sigma / 2 while the ledger still records sigma."""
    common = dict(variant="tokens", tokens=8, noise_multiplier=SIGMA, background=4)
    honest, broken, half = run_audits(
        [
            AuditConfig(trials=600, **common),
            AuditConfig(trials=400, fault="no-noise", **common),
            AuditConfig(trials=400, fault="half-noise", **common),
        ]
    )
    assert honest.table_shapes == ((1, 47),)
    _check_honest(honest)
    _check_noiseless_detected(broken)
    assert broken.score_shift == pytest.approx(1.0, rel=1e-3)  # exactly the clipped canary
    assert half.claimed_epsilon == pytest.approx(half.ledger_epsilon)
    assert half.score_std == pytest.approx(SIGMA / 2, rel=0.2)  # 200 draws: 4 standard errors


@pytest.mark.slow
def test_bucketed_model_audit_detects_a_wrong_clip_split() -> None:
    """36 blocks of 512 parameters, each its own DDP bucket with a 1 x 23 table: honest, the
    canary spanning all of them moves the likelihood-ratio score by 1 C; clipping each bucket to
    C instead of C / 6 moves it by 6 C, and 400 trials refute the claim (176 are expected to)."""
    common = dict(variant="buckets", dim=36 * 512, buckets=36, noise_multiplier=SIGMA)
    honest, broken = run_audits(
        [
            AuditConfig(trials=200, background=4, **common),
            AuditConfig(trials=400, background=4, fault="clip-split", **common),
        ]
    )
    assert honest.table_shapes == ((1, 23),) * 36
    _check_honest(honest)
    assert broken.predicted_shift == pytest.approx(6.0)
    assert broken.score_shift == pytest.approx(6.0, abs=0.7)  # 200 draws per side: 3.5 errors
    assert broken.score_std == pytest.approx(SIGMA, rel=0.15)
    assert broken.claimed_epsilon == pytest.approx(broken.ledger_epsilon)
    assert broken.test.epsilon_lower_bound > broken.claimed_epsilon
    assert broken.violated
    text = report(broken)
    assert "fault: clip-split" in text and "36 bucket(s)" in text and "VIOLATION" in text


@pytest.mark.slow
def test_rank_unit_audit_detects_missing_noise_on_two_ranks() -> None:
    """unit='rank' on two gloo ranks: rank 0's whole data is the canary or nothing. Honest, each
    rank's share N(0, sigma^2 C^2 / 2) sums to spread sigma C and the claim per rank holds;
    without noise it is refuted."""
    common = dict(variant="rank", world=2, noise_multiplier=SIGMA, compression=1.0)
    honest, broken = run_audits(
        [AuditConfig(trials=600, **common), AuditConfig(trials=400, fault="no-noise", **common)]
    )
    assert honest.table_shapes == ((1, 1024),)  # the exact table
    _check_honest(honest)
    _check_noiseless_detected(broken)
    assert broken.score_shift == pytest.approx(1.0, rel=1e-3)
    assert math.isfinite(broken.claimed_epsilon)
