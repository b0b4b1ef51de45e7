"""``bench private-models --quick`` with real processes (the examples under ``torchrun`` on 2 gloo
ranks, Opacus in one process): the table's structure, and each run checked against the others and
against Opacus's own accountant."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from opacus.accountants import RDPAccountant

from benchmarks.private_models import RUNS, configure, run

pytest.importorskip("transformers")


def _quick_rows(task: str, capsys: pytest.CaptureFixture[str], tmp_path) -> list[dict]:
    parser = argparse.ArgumentParser()
    configure(parser)
    path = tmp_path / "report.json"
    options = ["--quick", "--tasks", task, "--sampling-seed", "0", "--json", str(path)]
    assert run(parser.parse_args(options)) == 0
    out = capsys.readouterr().out
    assert out.startswith("| task | run | eval loss (initial) |")
    rows = json.loads(path.read_text())["rows"]
    assert json.loads(out[out.index("{") :]) == {"rows": rows}
    assert [(r["task"], r["run"]) for r in rows] == [(task, r) for r in RUNS]
    return rows


def _check_against_baselines(rows: list[dict]) -> None:
    private, opacus, allreduce = rows
    assert private["world"] == allreduce["world"] == 2 and opacus["world"] == 1
    # same model init and data: the same initial held-out loss
    assert private["initial_eval_loss"] == opacus["initial_eval_loss"]
    assert private["initial_eval_loss"] == allreduce["initial_eval_loss"]
    assert private["steps"] == opacus["steps"] == allreduce["steps"] == 4
    # same plan: the same sigma and q, and the epsilon of Opacus's accountant for the history
    assert private["noise_multiplier"] == opacus["noise_multiplier"]
    history = [tuple(h) for h in private["ledger_history"]]
    assert history == [tuple(h) for h in opacus["accountant_history"]]
    assert sum(steps for _, _, steps in history) == 4  # the ledger stepped once per step
    accountant = RDPAccountant()
    accountant.history = history
    assert math.isclose(private["epsilon"], accountant.get_epsilon(1e-5), rel_tol=1e-9)
    assert math.isclose(private["epsilon"], opacus["epsilon"], rel_tol=1e-9)
    assert 7.9 <= private["epsilon"] <= 8.0  # calibrated for epsilon 8 over exactly these steps
    assert allreduce["epsilon"] is None
    for row in rows:
        assert row["eval_loss"] < row["initial_eval_loss"], row
    assert allreduce["bytes_per_step"] == 4 * allreduce["parameters"]
    assert opacus["bytes_per_step"] == 0 and opacus["time_vs_opacus"] == 1.0


@pytest.mark.slow
def test_quick_gpt2_private_sketch_against_opacus_and_allreduce(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    rows = _quick_rows("gpt2", capsys, tmp_path)
    _check_against_baselines(rows)
    private, _, allreduce = rows
    assert private["initial_eval_loss"] > 5.0  # about ln 256: a byte-level model at init
    # the 20x sketch: each rank sends a twentieth of the allreduce's bytes (and a little more)
    assert private["compression_ratio"] > 19
    assert 15 * private["bytes_per_step"] < allreduce["bytes_per_step"]


@pytest.mark.slow
def test_quick_cnn_private_against_opacus_and_allreduce(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    rows = _quick_rows("cnn", capsys, tmp_path)
    _check_against_baselines(rows)
    private, _, allreduce = rows
    assert private["dataset_size"] == 1437  # the digits' training split
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    # the tiny CNN's one bucket is below min_compression_size: an exact table, allreduce's bytes
    assert private["compression_ratio"] == 1.0
    assert private["bytes_per_step"] == allreduce["bytes_per_step"]
