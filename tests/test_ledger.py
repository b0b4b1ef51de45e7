"""PrivacyLedger: agreement with Opacus, persistence, crash safety, budgets and bad input."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from sketchcomm.privacy import LedgerError, PrivacyBudgetExceeded, PrivacyLedger
from sketchcomm.privacy import cli as privacy_cli

DELTA = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[1]

# Varying noise multiplier and sample rate, with repeats so that runs get compressed.
VARYING_STEPS = (
    [(1.0, 0.01)] * 4 + [(0.8, 0.02)] * 3 + [(1.0, 0.01)] * 2 + [(1.3, 0.005)] * 3 + [(0.9, 0.01)]
)


def _opacus(accountant: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}[accountant]()


def _ledger(*args, **kwargs) -> PrivacyLedger:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return PrivacyLedger(*args, **kwargs)


def _opacus_epsilon(accountant: str, steps: list[tuple[float, float]]) -> float:
    acc = _opacus(accountant)
    for sigma, q in steps:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize(
    ("accountant", "steps", "history"),
    [
        (
            "rdp",
            VARYING_STEPS,
            [(1.0, 0.01, 4), (0.8, 0.02, 3), (1.0, 0.01, 2), (1.3, 0.005, 3), (0.9, 0.01, 1)],
        ),
        # The PRV accountant is slower, so it gets a shorter history.
        ("prv", VARYING_STEPS[:9], [(1.0, 0.01, 4), (0.8, 0.02, 3), (1.0, 0.01, 2)]),
    ],
    ids=["rdp", "prv"],
)
def test_epsilon_equals_opacus_over_varying_history(
    accountant: str, steps: list[tuple[float, float]], history: list, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(accountant, DELTA, path=path)
    reference = _opacus(accountant)
    checkpoints = {3, 7, len(steps) - 1}
    for index, (sigma, q) in enumerate(steps):
        returned = ledger.record_step(sigma, q)
        reference.step(noise_multiplier=sigma, sample_rate=q)
        if index in checkpoints:
            expected = reference.get_epsilon(DELTA)
            assert returned == expected
            assert ledger.epsilon == expected
            assert json.loads(path.read_text())["epsilon"] == expected
    assert ledger.history == reference.history == history
    assert ledger.steps == len(steps)


def test_gdp_epsilon_equals_opacus_and_refuses_changes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    with pytest.warns(UserWarning, match="underestimate"):
        ledger = PrivacyLedger("gdp", DELTA, path=path)
    reference = _opacus("gdp")
    for _ in range(50):
        ledger.record_step(1.1, 0.01)
        reference.step(noise_multiplier=1.1, sample_rate=0.01)
    assert ledger.epsilon == reference.get_epsilon(DELTA)
    assert ledger.history == reference.history == [(1.1, 0.01, 50)]

    before = path.read_bytes()
    with pytest.raises(ValueError, match="constant"):
        ledger.record_step(0.9, 0.01)
    assert ledger.steps == 50
    assert path.read_bytes() == before


def test_epsilon_after_and_would_exceed_record_nothing() -> None:
    ledger = PrivacyLedger("rdp", DELTA, budget=2.0)
    ledger.record_step(1.0, 0.01)
    planned = ledger.epsilon_after(1.0, 0.01, steps=100)
    assert planned == _opacus_epsilon("rdp", [(1.0, 0.01)] * 101)
    assert not ledger.would_exceed(1.0, 0.01, steps=100)
    assert ledger.would_exceed(1.0, 0.01, steps=10_000)
    assert ledger.steps == 1
    assert ledger.budget_remaining == pytest.approx(2.0 - ledger.epsilon)
    assert not PrivacyLedger("rdp", DELTA).would_exceed(0.5, 1.0, steps=10_000)


def test_reload_continues(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    first = PrivacyLedger("rdp", DELTA, budget=10.0, path=path)
    for sigma, q in VARYING_STEPS[:5]:
        first.record_step(sigma, q)
    created = json.loads(path.read_text())["created_at"]

    second = PrivacyLedger("rdp", DELTA, budget=10.0, path=path)
    assert second.history == first.history
    assert second.epsilon == first.epsilon
    for sigma, q in VARYING_STEPS[5:]:
        second.record_step(sigma, q)
    assert second.epsilon == _opacus_epsilon("rdp", VARYING_STEPS)
    stored = json.loads(path.read_text())
    assert stored["steps"] == len(VARYING_STEPS)
    assert stored["created_at"] == created


def test_file_is_persisted_before_record_step_returns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("rdp", DELTA, path=path)
    assert json.loads(path.read_text())["steps"] == 0
    for count, (sigma, q) in enumerate(VARYING_STEPS, start=1):
        epsilon = ledger.record_step(sigma, q)
        stored = json.loads(path.read_text())
        assert stored["steps"] == count
        assert stored["epsilon"] == epsilon
        assert stored["history"][-1] == {
            "noise_multiplier": sigma,
            "sample_rate": q,
            "steps": stored["history"][-1]["steps"],
        }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


CRASH_CHILD = textwrap.dedent(
    """
    import os, sys
    from sketchcomm.privacy import PrivacyLedger

    ledger_path, released_path = sys.argv[1], sys.argv[2]
    sigmas = [1.0, 1.1, 0.9, 1.2, 0.8, 1.3]
    ledger = PrivacyLedger("rdp", 1e-5, path=ledger_path)
    with open(released_path, "a") as released:
        for sigma in sigmas:
            ledger.record_step(sigma, 0.01)
            print("recorded", ledger.steps, flush=True)
            if not sys.stdin.readline():  # the parent says when a step may be released
                break
            released.write(f"{sigma}\\n")
            released.flush()
            os.fsync(released.fileno())
            print("released", flush=True)
    """
)


def test_crash_between_persist_and_release_over_reports(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.json"
    released_path = tmp_path / "released.txt"
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    child = subprocess.Popen(
        [sys.executable, str(script), str(ledger_path), str(released_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for step in (1, 2, 3):
            assert child.stdout.readline().split() == ["recorded", str(step)]
            # record_step has returned, so the step is on disk before it is released.
            assert json.loads(ledger_path.read_text())["steps"] == step
            assert released_path.read_text().count("\n") == step - 1
            child.stdin.write("release\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "released"
        # The fourth step: kill the process as soon as the ledger file shows it.
        deadline = time.monotonic() + 60
        while json.loads(ledger_path.read_text())["steps"] < 4:
            assert time.monotonic() < deadline, "the child never persisted its fourth step"
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    released = [float(line) for line in released_path.read_text().split()]
    assert released == [1.0, 1.1, 0.9]
    truly_spent = _opacus_epsilon("rdp", [(sigma, 0.01) for sigma in released])

    restarted = PrivacyLedger("rdp", DELTA, path=ledger_path)
    assert restarted.steps == 4
    assert restarted.epsilon >= truly_spent
    assert restarted.epsilon == _opacus_epsilon("rdp", [(s, 0.01) for s in [1.0, 1.1, 0.9, 1.2]])


def test_step_over_budget_is_refused_and_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    budget = _opacus_epsilon("rdp", [(1.0, 0.05)] * 3)
    ledger = PrivacyLedger("rdp", DELTA, budget=budget, path=path)
    for _ in range(3):
        ledger.record_step(1.0, 0.05)
    assert ledger.budget_remaining == 0.0
    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.record_step(1.0, 0.05)
    error = caught.value
    assert isinstance(error, RuntimeError)
    assert error.spent == ledger.epsilon == budget
    assert error.budget == budget
    assert error.would_be == _opacus_epsilon("rdp", [(1.0, 0.05)] * 4) > budget
    assert (error.delta, error.accountant) == (DELTA, "rdp")
    assert ledger.steps == 3
    assert path.read_bytes() == before
    assert PrivacyLedger("rdp", DELTA, budget=budget, path=path).steps == 3


def test_zero_noise_has_infinite_epsilon() -> None:
    with pytest.raises(PrivacyBudgetExceeded):
        PrivacyLedger("prv", DELTA, budget=100.0).record_step(0.0, 0.01)
    ledger = PrivacyLedger("prv", DELTA)
    assert ledger.record_step(0.0, 0.01) == float("inf")
    assert ledger.state_dict()["epsilon"] == "inf"


VALID = {
    "format": "sketchcomm-privacy-ledger",
    "schema_version": 1,
    "accountant": "rdp",
    "delta": DELTA,
    "budget": None,
    "unit": "example",
    "secure_mode": False,
    "dataset_size": None,
    "steps": 2,
    "epsilon": 1.0,
    "history": [{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 2}],
    "opacus_version": "1.6.0",
    "created_at": "2025-01-01T00:00:00+00:00",
    "updated_at": "2025-01-01T00:00:00+00:00",
}


def _v2(**changes) -> bytes:
    """A valid version 2 file (t = 1, outsiders face more noise), with ``changes``."""
    state = {
        **VALID,
        "schema_version": 2,
        "colluding_ranks": 1,
        "outsider_epsilon": 0.5,
        "outsider_history": [{"noise_multiplier": 1.5, "sample_rate": 0.01, "steps": 2}],
        **changes,
    }
    return json.dumps(state).encode()


def _corrupt(**changes) -> bytes:
    state = {key: value for key, value in VALID.items() if key not in changes.get("drop", ())}
    state.update({key: value for key, value in changes.items() if key != "drop"})
    return json.dumps(state).encode()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "not valid JSON"),
        (b'{"format": "sketchcomm-privacy-ledger", "schema', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "cannot be read"),
        (b"[1, 2]", "JSON object"),
        (_corrupt(format="something-else"), "format"),
        (_corrupt(schema_version=3), "schema_version"),
        (_corrupt(schema_version=2), "missing field"),
        (_v2(colluding_ranks=-1), "colluding_ranks"),
        (_v2(colluding_ranks=True), "colluding_ranks"),
        (_v2(outsider_history=[]), "outsider_history holds 0 steps"),
        (_v2(outsider_epsilon=None), "outsider_epsilon"),
        (_corrupt(drop=("history",)), "missing field"),
        (_corrupt(steps=3), "steps is 3"),
        (
            _corrupt(history=[{"noise_multiplier": -1.0, "sample_rate": 0.01, "steps": 2}]),
            "noise_multiplier",
        ),
        (
            _corrupt(history=[{"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 2}]),
            "sample_rate",
        ),
        (_corrupt(delta=2.0), "delta"),
    ],
)
def test_corrupt_file_raises_and_is_untouched(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    mtime = path.stat().st_mtime_ns
    with pytest.raises(LedgerError, match=problem):
        PrivacyLedger("rdp", DELTA, path=path)
    assert path.read_bytes() == content
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_valid_hand_written_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_bytes(_corrupt())
    assert PrivacyLedger("rdp", DELTA, path=path).history == [(1.0, 0.01, 2)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"accountant": "prv"}, "accountant"),
        ({"delta": 1e-6}, "delta"),
        ({"unit": "user"}, "unit"),
        ({"secure_mode": True}, "secure_mode"),
        ({"colluding_ranks": 1}, "colluding_ranks"),
    ],
)
def test_mismatched_file_raises_and_is_untouched(tmp_path: Path, kwargs: dict, field: str) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("rdp", DELTA, path=path)
    ledger.record_step(1.0, 0.01)
    before = path.read_bytes()
    arguments = {"accountant": "rdp", "delta": DELTA, **kwargs}
    with pytest.raises(LedgerError, match=f"{field}="):
        PrivacyLedger(arguments.pop("accountant"), arguments.pop("delta"), path=path, **arguments)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"accountant": "moments"}, "accountant"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"delta": "small"}, "delta"),
        ({"budget": 0.0}, "budget"),
        ({"budget": -1.0}, "budget"),
        ({"budget": float("inf")}, "budget"),
        ({"dataset_size": 0}, "dataset_size"),
        ({"dataset_size": 1000, "delta": 1e-3}, "delta must be below 1/dataset_size"),
        ({"unit": ""}, "unit"),
        ({"secure_mode": "yes"}, "secure_mode"),
        ({"colluding_ranks": -1}, "colluding_ranks"),
        ({"colluding_ranks": 1.0}, "colluding_ranks"),
    ],
)
def test_invalid_construction(kwargs: dict, name: str) -> None:
    arguments = {"accountant": "rdp", "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=name):
        PrivacyLedger(arguments.pop("accountant"), arguments.pop("delta"), **arguments)


@pytest.mark.parametrize(
    ("sigma", "q", "name"),
    [
        (-0.1, 0.01, "noise_multiplier"),
        (float("inf"), 0.01, "noise_multiplier"),
        (None, 0.01, "noise_multiplier"),
        (1.0, 0.0, "sample_rate"),
        (1.0, 1.01, "sample_rate"),
        (1.0, True, "sample_rate"),
    ],
)
def test_invalid_step_records_nothing(tmp_path: Path, sigma, q, name: str) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("rdp", DELTA, path=path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=name):
        ledger.record_step(sigma, q)
    with pytest.raises(ValueError, match="steps"):
        ledger.epsilon_after(1.0, 0.01, steps=0)
    assert ledger.steps == 0
    assert path.read_bytes() == before


def test_dataset_size_accepts_small_delta() -> None:
    assert PrivacyLedger("rdp", 1e-5, dataset_size=60_000).dataset_size == 60_000


def test_state_dict_never_forgets_steps(tmp_path: Path) -> None:
    source = PrivacyLedger("rdp", DELTA)
    for sigma, q in VARYING_STEPS[:6]:
        source.record_step(sigma, q)
    older = source.state_dict()
    for sigma, q in VARYING_STEPS[6:]:
        source.record_step(sigma, q)
    newer = source.state_dict()
    assert json.loads(json.dumps(newer)) == newer

    path = tmp_path / "ledger.json"
    target = PrivacyLedger("rdp", DELTA, path=path)
    target.load_state_dict(older)
    assert target.history == [(1.0, 0.01, 4), (0.8, 0.02, 2)]
    assert json.loads(path.read_text())["steps"] == 6
    target.load_state_dict(newer)
    assert target.history == source.history
    assert target.epsilon == source.epsilon
    target.load_state_dict(older)  # an older checkpoint does not roll the ledger back
    assert target.history == source.history

    diverging = PrivacyLedger("rdp", DELTA)
    diverging.record_step(2.0, 0.01)
    with pytest.raises(LedgerError, match="diverges"):
        target.load_state_dict(diverging.state_dict())
    with pytest.raises(LedgerError, match="accountant"):
        target.load_state_dict({**newer, "accountant": "prv"})
    with pytest.raises(LedgerError, match="missing field"):
        target.load_state_dict({key: v for key, v in newer.items() if key != "history"})
    assert target.history == source.history


def test_reader_does_not_write(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    reader = PrivacyLedger("rdp", DELTA, path=path, writer=False)
    reader.record_step(1.0, 0.01)
    assert not path.exists()

    writer = PrivacyLedger("rdp", DELTA, path=path)
    writer.record_step(1.0, 0.01)
    before = path.read_bytes()
    follower = PrivacyLedger("rdp", DELTA, path=path, writer=False)
    assert follower.steps == 1
    follower.record_step(1.0, 0.01)
    assert path.read_bytes() == before
    opened = PrivacyLedger.open(path)
    assert (opened.accountant, opened.delta, opened.steps, opened.writer) == (
        "rdp",
        DELTA,
        1,
        False,
    )


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sketchcomm privacy")
    privacy_cli.configure(parser)
    return privacy_cli.run(parser.parse_args(list(argv)))


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("rdp", DELTA, budget=5.0, path=path)
    for sigma, q in VARYING_STEPS:
        ledger.record_step(sigma, q)
    before = path.read_bytes()
    assert _cli("inspect", str(path)) == 0
    out = capsys.readouterr().out
    assert f"{ledger.epsilon:.6g}" in out
    assert "rdp" in out and "1e-05" in out and f"steps             : {ledger.steps}" in out
    assert _cli("inspect", "--json", str(path)) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(before)
    assert path.read_bytes() == before

    path.write_text("{}")
    assert _cli("inspect", str(path)) == 2
    assert "not a valid privacy ledger" in capsys.readouterr().err


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.01, 100)],
        [(0.83, 2**-10, 128), (1.2, 0.05, 7)],
        [(0.5, 1.0, 1)],
        [(2.0, 0.3, 1000), (0.7, 0.001, 3)],
    ],
)
def test_rdp_epsilon_equals_opacus_rdp_accountant_exactly(history: list) -> None:
    """The ledger's RDP epsilon (per-step RDP cached per (sigma, q)) is Opacus's own number."""
    from opacus.accountants import RDPAccountant

    from sketchcomm.privacy.accounting import epsilon_for_history

    reference = RDPAccountant()
    reference.history = list(history)
    assert epsilon_for_history("rdp", history, 1e-5) == reference.get_epsilon(1e-5)


def test_version_1_file_migrates_and_continues(tmp_path: Path) -> None:
    """A file written before the threat model was recorded: t unknown, outsider history equal."""
    path = tmp_path / "ledger.json"
    path.write_bytes(_corrupt())
    with pytest.raises(LedgerError, match=r"colluding_ranks=None.*construct the ledger with"):
        PrivacyLedger("rdp", DELTA, path=path, colluding_ranks=0)
    assert path.read_bytes() == _corrupt()
    ledger = PrivacyLedger.open(path, writer=True)
    assert ledger.colluding_ranks is None
    assert ledger.outsider_history == ledger.history == [(1.0, 0.01, 2)]
    assert ledger.outsider_epsilon == ledger.epsilon
    ledger.record_step(1.0, 0.01)
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == 2 and stored["colluding_ranks"] is None
    assert stored["outsider_history"] == stored["history"]


def test_hand_written_version_2_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_bytes(_v2())
    ledger = PrivacyLedger("rdp", DELTA, path=path, colluding_ranks=1)
    assert ledger.history == [(1.0, 0.01, 2)]
    assert ledger.outsider_history == [(1.5, 0.01, 2)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_outsider_epsilon_equals_opacus_fed_the_outsider_history(
    tmp_path: Path, accountant: str
) -> None:
    """W = 3, t = 1: the guaranteed sigma is what remains after one rank removes its share;
    outsiders face sigma * sqrt(3 / 2). Each epsilon is Opacus's own for its history."""
    from sketchcomm.privacy.mechanism import outsider_noise_multiplier

    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(accountant, DELTA, path=path, colluding_ranks=1)
    steps = VARYING_STEPS[:9]
    outsider_steps = [(outsider_noise_multiplier(s, 3, "distributed", 1), q) for s, q in steps]
    for (sigma, q), (outsider, _) in zip(steps, outsider_steps, strict=True):
        assert outsider == pytest.approx(sigma * (3 / 2) ** 0.5)
        ledger.record_step(sigma, q, outsider_noise_multiplier=outsider)
    assert ledger.epsilon == pytest.approx(_opacus_epsilon(accountant, steps), rel=1e-6)
    assert ledger.outsider_epsilon == pytest.approx(
        _opacus_epsilon(accountant, outsider_steps), rel=1e-6
    )
    assert ledger.outsider_epsilon < ledger.epsilon
    reopened = PrivacyLedger.open(path)
    assert reopened.colluding_ranks == 1
    assert reopened.outsider_history == ledger.outsider_history
    assert reopened.outsider_epsilon == ledger.outsider_epsilon
    stored = json.loads(path.read_text())
    assert stored["outsider_epsilon"] == ledger.outsider_epsilon


def test_budget_is_enforced_on_the_guaranteed_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    probe = PrivacyLedger("rdp", DELTA, colluding_ranks=1)
    guaranteed = probe.epsilon_after(1.0, 0.05, steps=20)
    outsider = probe.epsilon_after(2.0, 0.05, steps=20)
    budget = (guaranteed + outsider) / 2  # the outsider epsilon would fit, the guaranteed not
    ledger = PrivacyLedger("rdp", DELTA, budget=budget, path=path, colluding_ranks=1)
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(20):
            ledger.record_step(1.0, 0.05, outsider_noise_multiplier=2.0)
    assert ledger.epsilon <= budget < ledger.epsilon_after(1.0, 0.05)
    assert ledger.outsider_epsilon < budget
    assert json.loads(path.read_text())["steps"] == ledger.steps < 20


def test_outsider_multiplier_below_the_guaranteed_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger("rdp", DELTA, path=path, colluding_ranks=1)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"outsider_noise_multiplier .* at least"):
        ledger.record_step(1.0, 0.01, outsider_noise_multiplier=0.9)
    assert ledger.steps == 0 and path.read_bytes() == before


def test_state_dict_with_a_diverging_outsider_history_is_refused() -> None:
    source = PrivacyLedger("rdp", DELTA, colluding_ranks=1)
    source.record_step(1.0, 0.01, outsider_noise_multiplier=1.5)
    other = PrivacyLedger("rdp", DELTA, colluding_ranks=1)
    other.record_step(1.0, 0.01, outsider_noise_multiplier=2.0)
    with pytest.raises(LedgerError, match="diverges"):
        other.load_state_dict(source.state_dict())
    assert other.outsider_history == [(2.0, 0.01, 1)]
