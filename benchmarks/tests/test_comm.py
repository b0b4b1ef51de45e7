"""``sketchcomm bench comm``: real ranks in real network namespaces, bytes read off the veth.

The quick run trains the tiny Llama with allreduce, the sketch hook at 20x, the private sketch and
``noop_hook`` over a veth pair shaped to 100 Mbit/s (as root; on loopback otherwise). The bytes on
the wire are the kernel's counters, an independent measurement of what the hooks claim to send.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import comm
from benchmarks.char_lm import TINY_LM, load_char_text, make_lm
from benchmarks.comm_worker import check_hook
from benchmarks.netns import ShapedLink, check_rate, remove_leftovers, unavailable_reason
from sketchcomm.hooks import SketchState

NAMESPACES = unavailable_reason() is None
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason=f"{unavailable_reason()}")

# Protocol overhead on the wire above the hook's payload: TCP/IP headers (52 bytes per segment of
# at most 1,448 bytes, 3.6 %), the acknowledgements a rank sends for what it receives (about 66
# bytes per two segments, 2.3 %) and gloo's message headers; more for small messages.
PROTOCOL_OVERHEAD = 0.15


def _leftovers(prefix: str) -> list[str]:
    """Namespaces and host interfaces whose name starts with ``prefix``."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in names.splitlines() if line.startswith(prefix)]
    found += [line.split(":")[1].strip() for line in links.splitlines() if prefix in line]
    return found


@pytest.mark.slow
def test_quick_run_bytes_losses_and_cleanup(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report_path, plot_path = tmp_path / "comm.json", tmp_path / "comm.png"
    code = comm.main(
        ["--quick", "--netns-prefix", "skct", "--json", str(report_path), "--plot", str(plot_path)]
    )
    assert code == 0
    markdown = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    runs = {run["hook"]: run for run in report["runs"]}
    assert set(runs) == set(comm.QUICK_HOOKS)
    assert {run["rate"] for run in report["runs"]} == {"100mbit" if NAMESPACES else "loopback"}
    for hook, run in runs.items():
        assert len(run["losses"]) == len(run["step_times"]) == report["config"]["steps"]
        assert all(math.isfinite(loss) for loss in run["losses"]), hook
        assert math.isfinite(run["eval_loss"]), hook
        assert f"| {hook} |" in markdown

    # The hooks' own counts against sizes computed here: every gradient element in fp32 for
    # allreduce; the 20x table of the model's single bucket (it is below DDP's 1 MB first bucket).
    parameters = sum(p.numel() for p in make_lm(load_char_text().vocab_size, TINY_LM).parameters())
    assert runs["allreduce"]["hook_bytes_per_step"] == 4 * parameters
    rows, columns = SketchState(compression=20).config.table_shape_for(parameters)
    assert runs["sketch-20x"]["hook_bytes_per_step"] == 4 * rows * columns
    assert runs["private-sketch-20x"]["hook_bytes_per_step"] == 4 * rows * columns
    assert runs["sketch-20x"]["hook_bytes_per_step"] < runs["allreduce"]["hook_bytes_per_step"] / 15
    assert runs["noop"]["hook_bytes_per_step"] == 0

    if NAMESPACES:
        for hook in ("allreduce", "sketch-20x", "private-sketch-20x"):
            ratio = runs[hook]["wire_bytes_per_step"] / runs[hook]["hook_bytes_per_step"]
            assert 1.0 <= ratio <= 1.0 + PROTOCOL_OVERHEAD, (hook, ratio)
        assert runs["noop"]["wire_bytes_per_step"] < 0.01 * runs["allreduce"]["wire_bytes_per_step"]
        assert _leftovers("skct") == []
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_namespaces
def test_sigterm_removes_the_namespaces(tmp_path: Path) -> None:
    prefix = "skcs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.comm",
            "--quick",
            "--hooks",
            "allreduce",
            "--netns-prefix",
            prefix,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(name.startswith(f"{prefix}{proc.pid}") for name in _leftovers(prefix)):
            assert proc.poll() is None and time.monotonic() < deadline, "no namespace appeared"
            time.sleep(0.1)
        time.sleep(2.0)  # let the ranks start inside the namespaces
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "terminated by signal" in stderr
    assert _leftovers(prefix) == []


@needs_namespaces
def test_leftovers_of_dead_processes_are_removed() -> None:
    prefix = "skcl"
    dead_pid = 4_000_000 + os.getpid() % 100_000  # above the usual pid range: not running
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    alive, dead = f"{prefix}{os.getpid()}a", f"{prefix}{dead_pid}a"
    try:
        for name in (alive, dead):
            subprocess.run(["ip", "netns", "add", name], check=True)
        assert remove_leftovers(prefix) == [dead]
        assert _leftovers(prefix) == [alive]
    finally:
        for name in (alive, dead):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_loopback_fallback_counts_hook_bytes(capsys: pytest.CaptureFixture) -> None:
    argv = ["--quick", "--loopback", "--hooks", "allreduce", "noop", "--steps", "4"]
    assert comm.main([*argv, "--warmup", "2"]) == 0
    captured = capsys.readouterr()
    assert "running on loopback without shaping" in captured.err
    assert "### loopback" in captured.out and "not measured (loopback)" in captured.out


def test_overhead_removed_and_time_to_target() -> None:
    def run(hook: str, step_time: float, losses: list[float]) -> dict:
        times = [step_time] * len(losses)
        return {
            "hook": hook,
            "rate": "r",
            "step_times": times,
            "losses": losses,
            "median_step_time": step_time,
            "parameters": 10,
            "final_loss": losses[-1],
            "eval_loss": losses[-1],
            "hook_bytes_per_step": 40,
            "wire_bytes_per_step": None,
        }

    falling = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    runs = [
        run("allreduce", 5.0, falling),
        run("sketch", 1.4, falling),
        run("flat", 1.2, [5.0] * 10),
        run("noop", 1.0, falling),
    ]
    comm.add_comparisons(runs)
    by_hook = {r["hook"]: r for r in runs}
    # Target: allreduce's trailing mean of 5 at step ceil(0.65 * 10) = 7: mean(3, 2, 1, 1, 1).
    assert by_hook["sketch"]["target_loss"] == pytest.approx(1.6)
    assert by_hook["sketch"]["overhead_removed"] == pytest.approx((5.0 - 1.4) / (5.0 - 1.0))
    assert by_hook["sketch"]["compute_share"] == pytest.approx(1.0 / 1.4)
    assert by_hook["sketch"]["time_to_target"] == pytest.approx(7 * 1.4)
    assert by_hook["flat"]["time_to_target"] is None
    assert "not reached" in comm.markdown_report(
        {
            "commands": ["c"],
            "machine": "m",
            "network": "loopback",
            "runs": runs,
            "config": {
                "model": "tiny",
                "steps": 10,
                "warmup": 0,
                "batch_size": 1,
                "seq_len": 2,
                "lr": 0.1,
                "momentum": 0.9,
            },
        }
    )


def test_invalid_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="rate"):
        check_rate("100mb")
    with pytest.raises(ValueError, match="hook"):
        check_hook("sketch-abc")
    with pytest.raises(ValueError, match="prefix"):
        ShapedLink("much-too-long-prefix")
    with pytest.raises(SystemExit):
        comm.main(["--rates", "fast"])
