"""The DDP example under a real ``torchrun`` (two gloo processes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_ddp.py"


def torchrun(*args: str) -> str:
    """Run the example on two processes; returns rank 0's output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLE),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def final_lines(output: str) -> list[str]:
    """The last logged step, the accuracy and the bytes line."""
    lines = output.splitlines()
    return [line for line in lines if line.startswith(("step 40/", "test accuracy", "bytes"))]


@pytest.mark.slow
def test_example_trains_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.pt"
    # The default MLP: after DDP's first step its gradients travel in two buckets, which the
    # restarted model's first step does not have (it sends one): the state continues anyway.
    common = ["--hook", "sketch", "--compression", "20", "--log-every", "5"]
    resumable = [*common, "--checkpoint", str(checkpoint), "--checkpoint-every", "10"]

    first = torchrun(*resumable, "--steps", "20")
    assert "resumed" not in first
    assert checkpoint.exists()
    assert re.search(r"^test accuracy: 0\.\d{4}$", first, re.M)
    sent = re.search(r"^bytes sent per step: (\d+) \(allreduce: (\d+), ratio ([\d.]+)", first, re.M)
    assert sent is not None
    ratio = int(sent[2]) / int(sent[1])
    assert 19 < ratio < 21

    results = tmp_path / "results.json"
    second = torchrun(*resumable, "--steps", "40", "--json", str(results))
    assert f"resumed from {checkpoint} at step 20" in second
    assert re.findall(r"^step (\d+)/40 ", second, re.M) == ["25", "30", "35", "40"]
    figures = json.loads(results.read_text())
    assert figures["steps"] == 40 and figures["hook"] == "sketch"
    assert figures["bytes_per_step"] == int(sent[1])
    assert 0.0 <= figures["test_accuracy"] <= 1.0

    # The checkpoint holds everything the run depends on: resuming reproduces an uninterrupted run.
    assert final_lines(torchrun(*common, "--steps", "40")) == final_lines(second)
