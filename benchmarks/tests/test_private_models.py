"""``bench private-models --quick`` with real processes: the table's structure, and each run
checked against the others and against Opacus's own accountant."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from opacus.accountants import RDPAccountant

from benchmarks.private_models import RUNS, configure, run

pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_private_models_benchmark(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    parser = argparse.ArgumentParser()
    configure(parser)
    path = tmp_path / "report.json"
    args = parser.parse_args(["--quick", "--sampling-seed", "0", "--json", str(path)])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("| task | run | eval loss (initial) |")
    rows = json.loads(path.read_text())["rows"]
    assert json.loads(out[out.index("{") :]) == {"rows": rows}
    assert [(r["task"], r["run"]) for r in rows] == [(t, r) for t in ("gpt2", "cnn") for r in RUNS]
    for task in ("gpt2", "cnn"):
        private, opacus, allreduce = (r for r in rows if r["task"] == task)
        # same model init and data: the same initial held-out loss
        assert private["initial_eval_loss"] == opacus["initial_eval_loss"]
        assert private["initial_eval_loss"] == allreduce["initial_eval_loss"]
        assert private["steps"] == opacus["steps"] == allreduce["steps"] == 4
        # same plan: the same sigma and q, and the epsilon of Opacus's accountant for the history
        assert private["noise_multiplier"] == opacus["noise_multiplier"]
        assert [tuple(h) for h in private["ledger_history"]] == [
            tuple(h) for h in opacus["accountant_history"]
        ]
        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in private["ledger_history"]]
        assert math.isclose(private["epsilon"], accountant.get_epsilon(1e-5), rel_tol=1e-9)
        assert math.isclose(private["epsilon"], opacus["epsilon"], rel_tol=1e-9)
        assert private["epsilon"] <= 8.0 and allreduce["epsilon"] is None
        for row in (private, opacus, allreduce):
            assert row["eval_loss"] < row["initial_eval_loss"], row
        assert allreduce["bytes_per_step"] == 4 * allreduce["parameters"]
        assert opacus["time_vs_opacus"] == 1.0
    gpt2_private, gpt2_allreduce = rows[0], rows[2]
    assert gpt2_private["bytes_per_step"] * 10 < gpt2_allreduce["bytes_per_step"]
