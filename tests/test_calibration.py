"""Noise calibration, plan epsilon and the plan description, against Opacus's accountants."""

from __future__ import annotations

import argparse

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from sketchcomm.privacy import (
    calibrate_noise_multiplier,
    describe_plan,
    plan_epsilon,
    steps_for_epochs,
)
from sketchcomm.privacy import cli as privacy_cli

DELTA = 1e-5
SAMPLE_RATE = 0.02
STEPS = 250
TOLERANCE = 0.01


def _accountant_epsilon(accountant: str, sigma: float, sample_rate: float, steps: int) -> float:
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    acc.history = [(sigma, sample_rate, steps)]
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_calibration_round_trip(accountant: str, target: float) -> None:
    sigma = calibrate_noise_multiplier(
        target, DELTA, SAMPLE_RATE, steps=STEPS, accountant=accountant, epsilon_tolerance=TOLERANCE
    )
    epsilon = _accountant_epsilon(accountant, sigma, SAMPLE_RATE, STEPS)
    assert target - TOLERANCE <= epsilon <= target
    assert plan_epsilon(sigma, SAMPLE_RATE, STEPS, DELTA, accountant) == epsilon


def test_calibration_by_epochs_matches_steps() -> None:
    by_epochs = calibrate_noise_multiplier(2.0, DELTA, 0.01, epochs=3, accountant="rdp")
    assert steps_for_epochs(3, 0.01) == 300
    assert by_epochs == calibrate_noise_multiplier(2.0, DELTA, 0.01, steps=300, accountant="rdp")


def test_plan_epsilon_equals_opacus() -> None:
    assert plan_epsilon(1.1, 0.01, 1000, DELTA, "rdp") == _accountant_epsilon(
        "rdp", 1.1, 0.01, 1000
    )
    assert plan_epsilon(1.1, 0.01, 1000, DELTA, "prv") == _accountant_epsilon(
        "prv", 1.1, 0.01, 1000
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": float("inf")}, "target_epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"steps": None}, "exactly one of steps and epochs"),
        ({"epochs": 2.0}, "exactly one of steps and epochs"),
        ({"steps": None, "epochs": -1.0}, "epochs"),
        ({"accountant": "moments"}, "accountant"),
        ({"epsilon_tolerance": 0.0}, "epsilon_tolerance"),
        ({"epsilon_tolerance": 3.0}, "epsilon_tolerance"),
    ],
)
def test_calibration_rejects_bad_input(kwargs: dict, name: str) -> None:
    arguments = {
        "target_epsilon": 2.0,
        "delta": DELTA,
        "sample_rate": 0.01,
        "steps": 100,
        "accountant": "rdp",
        **kwargs,
    }
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(**arguments)


def test_describe_plan_states_unit_accountant_delta_and_epsilon() -> None:
    text = describe_plan(
        1.1,
        0.01,
        1000,
        DELTA,
        "rdp",
        unit="user",
        budget=1.0,
        dataset_size=50_000,
        secure_mode=True,
    )
    epsilon = plan_epsilon(1.1, 0.01, 1000, DELTA, "rdp")
    assert "one user" in text
    assert "RDPAccountant" in text
    assert "delta             : 1e-05" in text
    assert "noise multiplier  : 1.1" in text
    assert "sample rate q     : 0.01" in text
    assert "steps             : 1000" in text
    assert f"expected epsilon  : {epsilon:.4g}" in text
    assert "over budget" in text
    assert "cryptographically secure" in text
    assert "adds no privacy of its own" in text
    with pytest.raises(ValueError, match="1/dataset_size"):
        describe_plan(1.1, 0.01, 1000, DELTA, "rdp", dataset_size=1_000_000)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sketchcomm privacy")
    privacy_cli.configure(parser)
    return privacy_cli.run(parser.parse_args(list(argv)))


def test_cli_epsilon_and_calibrate(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--sample-rate", "0.01", "--delta", "1e-5", "--accountant", "rdp"]
    assert _cli("epsilon", "--sigma", "1.1", "--steps", "1000", *common) == 0
    epsilon = plan_epsilon(1.1, 0.01, 1000, DELTA, "rdp")
    assert f"expected epsilon  : {epsilon:.4g}" in capsys.readouterr().out

    assert _cli("calibrate", "--target-epsilon", "2", "--epochs", "3", *common) == 0
    out = capsys.readouterr().out
    sigma = calibrate_noise_multiplier(2.0, DELTA, 0.01, steps=300, accountant="rdp")
    assert f"noise multiplier: {sigma!r}" in out
    assert "within budget" in out

    assert _cli("epsilon", "--sigma", "-1", "--steps", "10", *common) == 2
    assert "noise_multiplier" in capsys.readouterr().err
