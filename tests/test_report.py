"""wandb reporting: the epsilon logged offline, read back from the run file, is the ledger's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from wandb_files import history_and_summary

from sketchcomm.privacy import PrivacyLedger
from sketchcomm.privacy.mechanism import outsider_noise_multiplier
from sketchcomm.report import (
    PrivacyReporter,
    format_privacy_report,
    resolve_wandb_mode,
    wandb_credentials_available,
)

DELTA = 1e-5
STEPS = [(1.0, 0.01)] * 3 + [(0.8, 0.02)] * 2 + [(1.2, 0.01)] * 3


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    return tmp_path / "wandb-runs"


@pytest.mark.xdist_group("wandb")
def test_offline_run_file_holds_the_ledger_epsilons(offline_wandb: Path, tmp_path: Path) -> None:
    ledger = PrivacyLedger(
        "rdp", DELTA, budget=5.0, path=tmp_path / "ledger.json", colluding_ranks=1
    )
    expected: dict[int, dict[str, float]] = {}
    outsider = RDPAccountant()
    with PrivacyReporter(ledger, project="sketchcomm-test", dir=offline_wandb, rank=0) as reporter:
        for index, (sigma, q) in enumerate(STEPS):
            # W = 2, t = 1: an outsider faces both shares, sigma * sqrt(2)
            outsider_sigma = outsider_noise_multiplier(sigma, 2, "distributed", 1)
            ledger.record_step(sigma, q, outsider_noise_multiplier=outsider_sigma)
            outsider.step(noise_multiplier=outsider_sigma, sample_rate=q)
            comm = {"bytes_sent": 1000.0 + index, "compression_ratio": 8.0}
            logged = reporter.log_step(comm)
            assert logged is not None
            assert logged["privacy/outsider_epsilon"] == pytest.approx(
                outsider.get_epsilon(DELTA), rel=1e-9
            )
            assert logged["privacy/outsider_epsilon"] < logged["privacy/epsilon"]
            expected[ledger.steps] = {
                "privacy/epsilon": ledger.epsilon,
                "privacy/outsider_epsilon": ledger.outsider_epsilon,
                "privacy/delta": DELTA,
                "privacy/noise_multiplier": sigma,
                "privacy/sample_rate": q,
                "privacy/steps": ledger.steps,
                "privacy/budget_remaining": ledger.budget_remaining,
                "comm/bytes_sent": comm["bytes_sent"],
                "comm/compression_ratio": 8.0,
            }
            assert logged == expected[ledger.steps]
        assert reporter.run.settings.mode == "offline"

    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")
    # wandb's service process may still be flushing the file when finish() returns under load.
    for _ in range(60):
        rows, summary = history_and_summary(run_file)
        if len(rows) >= len(STEPS) and summary:
            break
        time.sleep(0.5)
    assert sorted(rows) == sorted(expected)
    for step, values in expected.items():
        assert {key: rows[step][key] for key in values} == values
    assert len({values["privacy/epsilon"] for values in expected.values()}) == len(STEPS)
    assert rows[len(STEPS)]["privacy/summary/_type"] == "table-file"
    assert rows[len(STEPS)]["privacy/history/nrows"] == 3
    assert rows[len(STEPS)]["privacy/outsider_history/nrows"] == 3
    assert summary["privacy/epsilon"] == ledger.epsilon
    assert summary["privacy/outsider_epsilon"] == ledger.outsider_epsilon
    assert summary["privacy/colluding_ranks"] == 1
    assert summary["privacy/accountant"] == "rdp"
    assert summary["privacy/budget"] == 5.0
    assert summary["comm/total_bytes_sent"] == sum(1000.0 + i for i in range(len(STEPS)))
    assert summary["comm/mean_compression_ratio"] == 8.0


def test_other_ranks_do_nothing(offline_wandb: Path) -> None:
    reporter = PrivacyReporter(None, dir=offline_wandb, rank=1)
    assert not reporter.enabled
    assert reporter.run is None
    assert reporter.log_step({"bytes_sent": 1.0}) is None
    reporter.finish()
    assert not offline_wandb.exists()
    with pytest.raises(ValueError, match="ledger"):
        PrivacyReporter(None, dir=offline_wandb, rank=0)


def test_mode_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.com login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not wandb_credentials_available()
    assert resolve_wandb_mode() == "offline"

    netrc_file.write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    assert wandb_credentials_available()
    assert resolve_wandb_mode() == "online"

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode() == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="mode"):
        resolve_wandb_mode("sometimes")

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert resolve_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert resolve_wandb_mode() == "online"


def test_format_privacy_report(tmp_path: Path) -> None:
    ledger = PrivacyLedger("rdp", DELTA, budget=5.0, path=tmp_path / "ledger.json")
    for sigma, q in STEPS:
        ledger.record_step(sigma, q)
    text = format_privacy_report(ledger, comm={"bytes_sent": 123456.0})
    assert f"epsilon, t ranks  : {ledger.epsilon:.6g}" in text
    assert f"epsilon, outsiders: {ledger.outsider_epsilon:.6g}" in text
    assert "threat model      : not recorded" in text
    assert f"remaining {ledger.budget_remaining:.6g}" in text
    assert "delta             : 1e-05" in text
    assert "one example" in text and "RDPAccountant" in text
    assert f"steps             : {len(STEPS)}" in text
    assert "0.8          0.02         2" in text
    assert "history, outsiders" not in text  # one history when both are equal
    assert "bytes_sent" in text and "123456" in text
    assert f"({ledger.epsilon:.4g}, 1e-05)-DP for each example" in text
    assert "adds no privacy of its own" in text


def test_format_privacy_report_states_both_epsilons_with_t() -> None:
    ledger = PrivacyLedger("rdp", DELTA, colluding_ranks=1, secure_mode=True)
    for sigma, q in STEPS:
        ledger.record_step(sigma, q, outsider_noise_multiplier=sigma * 1.5)
    text = format_privacy_report(ledger)
    reference = RDPAccountant()
    reference.history = [(sigma * 1.5, q, 1) for sigma, q in STEPS]
    outsider = reference.get_epsilon(DELTA)
    assert ledger.outsider_epsilon == pytest.approx(outsider, rel=1e-9)
    assert "threat model      : t = 1 colluding rank(s)" in text
    assert f"epsilon, outsiders: {ledger.outsider_epsilon:.6g}" in text
    assert f"epsilon, t ranks  : {ledger.epsilon:.6g}" in text
    assert "history, outsiders" in text and "1.2          0.02         2" in text
    assert "the operating system's CSPRNG" in text
    assert (
        f"({ledger.epsilon:.4g}, 1e-05)-DP for each example (add/remove-one adjacency) towards "
        "outside observers and any 1 colluding rank(s), and "
        f"({ledger.outsider_epsilon:.4g}, 1e-05)-DP towards outside observers"
    ) in text.replace("\n", " ")
