"""Integrations under real launchers: PyTorch Lightning's DDP strategy, and torchrun on two nodes.

Every run is a real ``torchrun`` job of gloo processes on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def finish(process: subprocess.Popen, timeout: float = 180) -> str:
    """Wait for ``process``; fail with its output unless it exits with 0. Returns its stdout."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"timed out after {timeout} s\n{out}\n{err}")
    assert process.returncode == 0, f"exit code {process.returncode}\n{out}\n{err}"
    return out


def start(*command: str, launcher: list[str] = TORCHRUN) -> subprocess.Popen:
    return subprocess.Popen(
        [*launcher, *command],
        cwd=REPO,
        env={**ENV, "PYTHON": sys.executable},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_lightning_ddp_with_sketch_hook_trains_like_allreduce(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    common = ["--steps", "150", "--compression", "10", "--no-progress-bar"]
    figures = {}
    for hook in ("allreduce", "sketch"):
        path = tmp_path / f"{hook}.json"
        finish(
            start(
                "--standalone",
                "--nproc_per_node=2",
                "examples/lightning_ddp.py",
                "--hook",
                hook,
                "--json",
                str(path),
                *common,
            )
        )
        figures[hook] = json.loads(path.read_text())

    reference, sketched = figures["allreduce"], figures["sketch"]
    assert reference["world_size"] == sketched["world_size"] == 2
    assert reference["steps"] == sketched["steps"] == 150
    # The hook ran in every step (Lightning on the CPU ignores DDPStrategy's ddp_comm_hook, which
    # would leave these at zero) and sent 10x fewer bytes than allreduce.
    assert sketched["sketched_iterations"] == 150
    ratio = sketched["allreduce_bytes_per_step"] / sketched["bytes_per_step"]
    assert 9 < ratio < 11
    assert reference["test_accuracy"] > 0.9
    assert sketched["test_accuracy"] > reference["test_accuracy"] - 0.05


@pytest.mark.slow
def test_two_node_torchrun_matches_a_single_node_run(tmp_path: Path) -> None:
    example = ["examples/train_ddp.py", "--hook", "sketch", "--steps", "30", "--log-every", "10"]

    def run_args(name: str) -> list[str]:
        return [*example, "--checkpoint", str(tmp_path / f"{name}.pt"), "--checkpoint-every", "30"]

    single = start("--standalone", "--nproc_per_node=2", *run_args("single"))
    single_out = finish(single)

    # Two "nodes" of one process each, started by the multi-node recipe (two torchrun agents
    # rendezvousing through the c10d store) with HOST = 127.0.0.1.
    endpoint = f"127.0.0.1:{free_port()}"
    multinode = ["bash", str(REPO / "examples" / "multinode.sh")]
    nodes = [
        start(endpoint, "two-node-test", *run_args("multi"), launcher=multinode) for _ in range(2)
    ]
    outputs = [finish(node) for node in nodes]
    multi_out = next(out for out in outputs if "test accuracy" in out)  # the node holding rank 0

    single_ckpt = torch.load(tmp_path / "single.pt", weights_only=False)
    multi_ckpt = torch.load(tmp_path / "multi.pt", weights_only=False)
    assert single_ckpt["world_size"] == multi_ckpt["world_size"] == 2
    assert single_ckpt["step"] == multi_ckpt["step"] == 30
    # Each rank's batches depend only on its rank and the step, and a two-way sum is exact in
    # either order, so the two launches train bit-identical models.
    for name, value in single_ckpt["model"].items():
        assert torch.equal(value, multi_ckpt["model"][name]), name
    final = [line for line in single_out.splitlines() if line.startswith(("step 30/", "test acc"))]
    assert len(final) == 2
    assert all(line in multi_out.splitlines() for line in final)
