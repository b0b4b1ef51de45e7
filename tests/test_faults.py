"""Fault injection into the private training job under torchrun: ranks killed with SIGKILL in the
middle of training, restarted by torchrun or by hand.

Each run is ``tests/fault_job.py`` (the job of :mod:`sketchcomm.demo.private_training`, observed
from outside): every rank logs each step it completed to a file of its own, an independent count of
the noisy sums that were released and applied. The checks, after the job finished:

* the job resumed from its last checkpoint, not from scratch, and continued the Poisson schedule
  at the ledger's step count (:func:`sketchcomm.demo.private_training.resume_step`);
* no step of the schedule was completed twice, and every step the ledger holds was released,
  except a step the writer recorded and was killed before releasing (counted, never released:
  the ledger over-reports by that step and never under-reports);
* the ledger's epsilon equals that of Opacus's ``RDPAccountant`` fed the same steps with the
  noise multiplier the mechanism used (read from the checkpoint).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from sketchcomm.demo.digits import load_digits
from sketchcomm.privacy import PrivacyLedger

STEPS = 12
CHECKPOINT_EVERY = 4
BATCH_SIZE = 64
DELTA = 1e-5
FAULT_JOB = Path(__file__).with_name("fault_job.py")


def _torchrun(run_dir: Path, fault: str, max_restarts: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        f"--max-restarts={max_restarts}",
        str(FAULT_JOB),
        f"--run-dir={run_dir / 'run'}",
        f"--steps={STEPS}",
        f"--checkpoint-every={CHECKPOINT_EVERY}",
        f"--batch-size={BATCH_SIZE}",
        f"--delta={DELTA}",
        "--target-epsilon=8",
        "--no-progress",
    ]
    env = {
        **os.environ,
        "FAULT_DIR": str(run_dir),
        "FAULT_AT": fault,
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        # torchrun shares its rendezvous store with restarted workers, which then read the gloo
        # addresses of the killed ones (pytorch/pytorch#135712): restarts need a fresh store.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _completed_steps(run_dir: Path, rank: int) -> list[tuple[int, int]]:
    """``(step, restart count)`` of each step the rank completed, in order."""
    lines = (run_dir / f"completed-rank{rank}.log").read_text().splitlines()
    return [(int(line.split()[0]), int(line.split()[1])) for line in lines]


def _check_accounting(run_dir: Path, released: set[int]) -> PrivacyLedger:
    """The ledger against the released steps and against Opacus's RDP accountant."""
    ledger = PrivacyLedger.open(run_dir / "run" / "ledger.json")
    checkpoint = torch.load(run_dir / "run" / "checkpoint.pt", weights_only=False)
    sigma = checkpoint["hook"]["config"]["noise_multiplier"]
    sample_rate = BATCH_SIZE / len(load_digits().x_train)
    reference = RDPAccountant()
    for _ in range(ledger.steps):
        reference.step(noise_multiplier=sigma, sample_rate=sample_rate)
    assert ledger.history == [(sigma, sample_rate, ledger.steps)]
    assert ledger.epsilon == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)
    assert released <= set(range(ledger.steps))
    return ledger


def _assert_each_step_once(run_dir: Path) -> set[int]:
    """Both ranks completed the same steps, none twice; returns them."""
    per_rank = [_completed_steps(run_dir, rank) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1]
    steps = [step for step, _ in per_rank[0]]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    return set(steps)


@pytest.mark.slow
def test_rank_killed_between_steps_is_restarted_by_torchrun(tmp_path: Path) -> None:
    """Rank 1 dies before step 6 (checkpoint at 4, ledger at 6): torchrun restarts both ranks,
    which resume the model at step 4 and the schedule at step 6."""
    result = _torchrun(tmp_path, "between:1:6", max_restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fired-rank1").exists() and "exitcode: -9" in result.stderr
    assert "resuming at step 6 from the checkpoint of step 4" in result.stdout
    assert "test accuracy" in result.stdout

    released = _assert_each_step_once(tmp_path)
    assert [restart for _, restart in _completed_steps(tmp_path, 0)] == [0] * 6 + [1] * 6
    assert released == set(range(STEPS))
    assert _check_accounting(tmp_path, released).steps == len(released) == STEPS


@pytest.mark.slow
def test_writer_killed_after_ledger_write_before_release(tmp_path: Path) -> None:
    """Rank 0, the ledger's writer, dies inside the hook of step 6 after persisting the step and
    before its noisy table leaves: step 6 stays counted and is never drawn again."""
    result = _torchrun(tmp_path, "release:0:6", max_restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fired-rank0").exists() and "exitcode: -9" in result.stderr
    assert "resuming at step 7 from the checkpoint of step 4" in result.stdout

    released = _assert_each_step_once(tmp_path)
    assert released == set(range(STEPS)) - {6}
    ledger = _check_accounting(tmp_path, released)
    assert ledger.steps == len(released) + 1 == STEPS


@pytest.mark.slow
def test_whole_job_crash_restarted_by_hand(tmp_path: Path) -> None:
    """Both ranks die between steps 5 and 6 with no restart left; the same command, run again,
    resumes and the ledger continues."""
    crashed = _torchrun(tmp_path, "between:0,1:6", max_restarts=0)
    assert crashed.returncode != 0
    assert (tmp_path / "fired-rank0").exists() and (tmp_path / "fired-rank1").exists()
    assert PrivacyLedger.open(tmp_path / "run" / "ledger.json").steps == 6

    result = _torchrun(tmp_path, "between:0,1:6", max_restarts=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 6 from the checkpoint of step 4" in result.stdout

    released = _assert_each_step_once(tmp_path)
    assert released == set(range(STEPS))
    assert _check_accounting(tmp_path, released).steps == STEPS
