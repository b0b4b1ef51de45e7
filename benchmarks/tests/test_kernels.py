"""``sketchcomm bench kernels``: the quick run writes its plot; bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sketchcomm.cli import main


def test_bench_kernels_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "kernels.png"
    argv = ["bench", "kernels", "--quick", "--devices", "cpu", "--sizes", "1e5", "--rows", "1"]
    assert main([*argv, "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "1000"], "fewer than sqrt(1000)"),
        (["--sizes", "1e5", "--json", "/nonexistent/dir/k.json"], "directory does not exist"),
    ],
)
def test_bench_kernels_rejects_bad_settings_before_measuring(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "kernels", "--devices", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sizes", "1.5"], ["--rows", "0"], ["--compression", "1"]])
def test_bench_kernels_rejects_bad_numbers(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kernels", *argv])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_hook_step_runs_both_hooks_on_ddp_buckets() -> None:
    """DDP's rebuilt buckets of the 13.7M-parameter transformer hold every parameter; the sketch
    hook compressed them, and every variant's time is a positive ratio to the copy."""
    from benchmarks.hook_step import hook_step_report, markdown_hook_table

    report = hook_step_report(repeats=1, warmup=2)
    assert sum(report["buckets"]) == report["parameters"] > 13_000_000
    assert len(report["buckets"]) > 1 and report["compressed_bucket_steps"] > 0
    assert report["per_copy"]["copy"] == 1.0 and report["per_powersgd"]["powersgd"] == 1.0
    assert all(r > 0 for r in report["per_copy"].values())
    assert markdown_hook_table(report).count("\n") == len(report["seconds"]) + 1
