"""The private GPT-2 and CNN examples under a real ``torchrun`` (2 gloo ranks, tiny settings):
each trains, spends no more than its epsilon, and its epsilon is Opacus's RDP accountant's for the
steps its ledger recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def _run_example(script: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "examples" / script),
        "--tiny",
        "--steps",
        "3",
        "--sampling-seed",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout  # rank 0 only
    return json.loads(lines[0][len("RESULT ") :])


def _check_privacy(result: dict) -> None:
    assert result["mode"] == "private" and result["world"] == 2 and result["steps"] == 3
    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in result["ledger_history"]]
    assert sum(entry[2] for entry in accountant.history) == 3
    assert math.isclose(result["epsilon"], accountant.get_epsilon(1e-5), rel_tol=1e-9)
    assert 7.9 <= result["epsilon"] <= 8.0  # calibrated for epsilon 8 over exactly these steps
    assert result["bytes_per_step"] > 0


@pytest.mark.slow
def test_private_gpt2_example_trains_a_tied_byte_level_model() -> None:
    result = _run_example("train_private_lm.py")
    _check_privacy(result)
    assert result["compression_ratio"] > 10  # the 20x sketch: far fewer bytes than the gradient
    assert result["bytes_per_step"] * 10 < 4 * result["parameters"]
    assert math.isfinite(result["eval_loss"]) and result["initial_eval_loss"] > 5.0  # ~ ln 256


@pytest.mark.slow
def test_private_cnn_example_reports_test_accuracy() -> None:
    result = _run_example("train_private_cnn.py")
    _check_privacy(result)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["dataset_size"] == 1437 and math.isfinite(result["eval_loss"])
