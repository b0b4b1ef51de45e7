"""Noise calibration, plan epsilon and the plan description, against Opacus's accountants."""

from __future__ import annotations

import argparse

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from sketchcomm.privacy import calibrate_noise_multiplier, describe_plan, plan_epsilon
from sketchcomm.privacy import cli as privacy_cli
from sketchcomm.privacy.calibration import steps_for_epochs

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
    assert f"epsilon, t ranks  : {epsilon:.4g}" in text
    assert f"epsilon, outsiders: {epsilon:.4g}" in text
    assert "t = 0" in text
    assert "over budget" in text
    assert "CSPRNG (os.urandom)" in text
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
    assert f"epsilon, t ranks  : {epsilon:.4g}" in capsys.readouterr().out
    threat = ["--world-size", "4", "--colluding-ranks", "1"]
    assert _cli("epsilon", "--sigma", "1.1", "--steps", "1000", *common, *threat) == 0
    outsider = plan_epsilon(1.1 * (4 / 3) ** 0.5, 0.01, 1000, DELTA, "rdp")
    out = capsys.readouterr().out
    assert f"epsilon, outsiders: {outsider:.4g}" in out
    assert f"epsilon, t ranks  : {epsilon:.4g}" in out

    assert _cli("calibrate", "--target-epsilon", "2", "--epochs", "3", *common) == 0
    out = capsys.readouterr().out
    sigma = calibrate_noise_multiplier(2.0, DELTA, 0.01, steps=300, accountant="rdp")
    assert f"noise multiplier: {sigma!r}" in out
    assert "within budget" in out

    assert _cli("epsilon", "--sigma", "-1", "--steps", "10", *common) == 2
    assert "noise_multiplier" in capsys.readouterr().err


@pytest.mark.parametrize(("world", "t"), [(2, 1), (4, 1), (4, 3)])
def test_describe_plan_states_both_epsilons_as_opacus_computes_them(world: int, t: int) -> None:
    sigma, q, steps = 1.1, 0.01, 500
    text = describe_plan(
        sigma, q, steps, DELTA, "rdp", dataset_size=10_000, world_size=world, colluding_ranks=t
    )
    guaranteed = _accountant_epsilon("rdp", sigma, q, steps)
    outsider = _accountant_epsilon("rdp", sigma * (world / (world - t)) ** 0.5, q, steps)
    assert f"epsilon, t ranks  : {guaranteed:.4g}" in text
    assert f"epsilon, outsiders: {outsider:.4g}" in text
    assert f"t = {t} colluding rank(s) of W = {world}" in text
    if t < world - 1:  # the next coalition, t + 1 ranks, faces sigma * sqrt((W-t-1)/(W-t))
        exposed = _accountant_epsilon(
            "rdp", sigma * ((world - t - 1) / (world - t)) ** 0.5, q, steps
        )
        assert f"{t + 1} colluding rank(s): multiplier" in text
        assert f"epsilon {exposed:.4g}" in text
    else:
        assert "not covered" not in text
    assert "swamp" not in text  # q N = 100 contributions against sigma_out < 3


def test_describe_plan_warns_when_the_noise_swamps_the_signal() -> None:
    """unit="rank" with 2 ranks at epsilon 8: sigma of about 4 against 2 contributions."""
    steps = 200
    sigma = calibrate_noise_multiplier(8.0, DELTA, 1.0, steps=steps, accountant="rdp")
    text = describe_plan(sigma, 1.0, steps, DELTA, "rdp", unit="rank", world_size=2)
    outsider = sigma * 2**0.5  # t defaults to W - 1 = 1 for unit="rank"
    assert "t = 1 colluding rank(s) of W = 2" in text
    assert f"signal / noise    : {2 / outsider:.3g}" in text
    assert "the noise will swamp the signal" in text


def test_describe_plan_refuses_an_unsound_threat_model() -> None:
    with pytest.raises(ValueError, match="noise_placement='distributed'"):
        describe_plan(
            1.0, 1.0, 10, DELTA, "rdp", unit="rank", world_size=2, noise_placement="single"
        )
    with pytest.raises(ValueError, match="noise_placement='distributed'"):
        describe_plan(
            1.0, 0.01, 10, DELTA, "rdp", world_size=2, colluding_ranks=1, noise_placement="single"
        )
    with pytest.raises(ValueError, match="colluding_ranks must be an integer from 0 to"):
        describe_plan(1.0, 0.01, 10, DELTA, "rdp", world_size=2, colluding_ranks=2)
    with pytest.raises(ValueError, match="give world_size"):
        describe_plan(1.0, 0.01, 10, DELTA, "rdp", colluding_ranks=1)
    without_world = describe_plan(1.0, 1.0, 10, DELTA, "rdp", unit="rank")
    assert "t = W - 1 (every other rank" in without_world
    single = describe_plan(1.0, 0.01, 10, DELTA, "rdp", world_size=2, noise_placement="single")
    assert "1 colluding rank(s): multiplier 0, epsilon infinite" in single
