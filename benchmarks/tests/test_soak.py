"""The soak benchmark: its memory probes against independent references, and a quick soak of the
sketch and private hooks on two gloo ranks (hook state constant after warm-up, no RSS growth of
the size a per-step leak would cause, the ledger stepped once per step)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks.soak import SoakConfig, rss_bytes, state_tensor_bytes
from sketchcomm.cli import main


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_rss_bytes_agrees_with_proc_status_and_sees_an_allocation() -> None:
    """In a fresh interpreter: a long-lived test process may serve the block from pages it
    already holds, so that its RSS does not grow."""
    probe = (
        "import torch; from benchmarks.soak import rss_bytes; before = rss_bytes(); "
        "block = torch.ones(64 << 18); print(before, rss_bytes())"
    )
    assert abs(rss_bytes() - _vm_rss_bytes()) < 8 << 20
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    before, after = map(int, result.stdout.split())
    assert after - before > 60 << 20  # 64 MiB of fp32, every page touched


def test_state_tensor_bytes_counts_each_storage_once() -> None:
    shared = torch.zeros(100)  # 400 bytes
    inner = SimpleNamespace(table=torch.zeros(3, 5), view=shared[10:20])  # 60 bytes + a view
    root = SimpleNamespace(
        buckets={0: inner, 1: [shared, (torch.zeros(2, dtype=torch.int64),)]},  # 16 bytes
        model=nn.Linear(50, 50),  # a module: its parameters are not hook state
        count=3,
    )
    root.itself = root  # cycles are fine
    assert state_tensor_bytes(root) == 400 + 60 + 16


def test_soak_config_names_bad_parameters() -> None:
    with pytest.raises(ValueError, match="every"):
        SoakConfig(steps=100, every=0)
    with pytest.raises(ValueError, match="steps"):
        SoakConfig(steps=50, every=10)
    with pytest.raises(ValueError, match="compression"):
        SoakConfig(compression=1.0)


@pytest.mark.slow
def test_quick_soak_of_the_sketch_and_private_hooks(tmp_path) -> None:
    path = tmp_path / "soak.json"
    status = main(["bench", "soak", "--quick", "--hooks", "sketch", "private", "--json", str(path)])
    assert status == 0
    report = json.loads(path.read_text())
    steps = report["config"]["steps"]
    for summary in report["summary"]:
        hook = summary["hook"]
        # Per-bucket state (hash parameters, FetchSGD's error and momentum tables) is allocated
        # once: exactly the same bytes at every record after warm-up, on every rank.
        assert summary["state_bytes_constant"], hook
        per_rank = {
            record["state_bytes"]
            for rank in report["results"][hook]
            for record in rank["records"]
            if record["step"] > summary["warmup_steps"]
        }
        assert per_rank == {summary["state_bytes"]}
        assert summary["state_bytes"] > 0
        # Leaking one fp32 gradient-sized buffer per step would grow RSS by
        # leak_reference_bytes (about 60 MiB here) over the window; allocator noise is a few MiB.
        assert summary["rss_growth_bytes"] < summary["leak_reference_bytes"] / 2, hook
    private = next(s for s in report["summary"] if s["hook"] == "private")
    assert private["ledger_steps"] == steps  # one ledger step per optimizer step
