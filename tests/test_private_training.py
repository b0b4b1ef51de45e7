"""The private training job end to end under torchrun: ledger, checkpoint, restart, budget across
restarts, and the wandb offline run files against the ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_files import history_and_summary

from sketchcomm.privacy import PrivacyLedger


def _torchrun(run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "sketchcomm.demo.private_training",
        f"--run-dir={run_dir}",
        f"--steps={steps}",
        "--target-epsilon=8",
        "--checkpoint-every=5",
        "--no-progress",
        "--hidden=128",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.xdist_group("wandb")  # wandb services of parallel tests must not meet
def test_private_job_ledger_restart_budget_and_wandb(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _torchrun(run_dir, steps=10)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "test accuracy" in first.stdout and "Privacy report" in first.stdout
    ledger = PrivacyLedger.open(run_dir / "ledger.json")
    assert ledger.steps == 10 and ledger.epsilon <= 8.0
    saved = json.loads((run_dir / "ledger.json").read_text())
    assert saved["accountant"] == "rdp"

    # The wandb run files on disk hold the ledger's epsilon at the last step.
    run_files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows, summary = history_and_summary(run_files[0])
    assert rows[10]["privacy/epsilon"] == pytest.approx(ledger.epsilon, rel=1e-12)
    assert rows[10]["comm/compression_ratio"] > 10
    assert summary["privacy/epsilon"] == pytest.approx(ledger.epsilon, rel=1e-12)

    # Restarting a finished run resumes from its checkpoint and counts nothing twice.
    second = _torchrun(run_dir, steps=10)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 10" in second.stdout
    assert PrivacyLedger.open(run_dir / "ledger.json").steps == 10

    # Asking for more steps on the same budget is refused before any further release.
    third = _torchrun(run_dir, steps=14)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "stopped:" in third.stdout and "budget" in third.stdout
    assert PrivacyLedger.open(run_dir / "ledger.json").steps == 10
