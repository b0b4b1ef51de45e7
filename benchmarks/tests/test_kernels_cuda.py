"""``python -m benchmarks.kernels_cuda`` runs end to end (tiny sizes, Triton's interpreter on the
CPU, in a fresh interpreter with ``TRITON_INTERPRET=1``) and writes a complete report."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.kernels_cuda import KERNELS, main

REPOSITORY = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="needs Triton (pip install 'sketchcomm[cuda]' or the dev extra)",
)


@needs_triton
def test_interpreted_run_writes_a_complete_report(tmp_path: Path) -> None:
    path = tmp_path / "cuda.json"
    argv = ["--device", "cpu", "--sizes", "3000", "--rows", "1", "3", "--compression", "5"]
    argv += ["--repeats", "1", "--warmup", "0", "--min-time", "0", "--json", str(path)]
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPOSITORY)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels_cuda", *argv],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(path.read_text())
    assert [(case["size"], case["rows"]) for case in report["cases"]] == [(3000, 1), (3000, 3)]
    for case in report["cases"]:
        assert case["tables_equal"] and case["estimate_equal"]
        for name in ("copy", *KERNELS):
            assert math.isfinite(case["seconds"][name]) and case["seconds"][name] > 0
        assert case["ratios"]["sketch+estimate"] > 0
    assert "| 3e+03 | 3 |" in done.stdout


@needs_triton
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_missing_cuda_device_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sizes", "1e5"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
