"""``python -m benchmarks.accuracy`` in quick mode: real gloo ranks, a few steps.

During the first ``start_iter`` iterations the sketch hook allreduces, so a sketched run that
stops there equals allreduce's run of the same seed exactly (same initialisation, same batches):
that checks the harness. One step more and the hook has seen the optimizer and says what it chose.
"""

from __future__ import annotations

import pytest

from benchmarks.accuracy import Run, compare, markdown, summarise
from benchmarks.accuracy_methods import sketch_options


def test_quick_comparison_pairs_runs_and_reports_the_choice() -> None:
    runs = [
        Run(0, "adamw", "allreduce", 2, eval_batches=2),
        Run(0, "adamw", "default@10", 2, eval_batches=2),
        Run(0, "sgd", "allreduce", 3, eval_batches=2),
        Run(0, "sgd", "default@10", 3, eval_batches=2),
    ]
    results = compare(runs)
    assert [r["method"] for r in results] == [r.method for r in runs]
    assert results[1]["eval_loss"] == results[0]["eval_loss"]
    assert "AdamW left as it is" in results[1]["chose"]
    assert "SGD momentum 0.9 moved into sketch space" in results[3]["chose"]
    assert results[3]["ratio"] > 9.0
    rows = {(r["optimizer"], r["method"]): r for r in summarise(results)}
    assert rows[("adamw", "default@10")]["relative"] == 1.0
    assert rows[("sgd", "allreduce")]["relative"] == 1.0
    assert "| sgd | default@10 |" in markdown(summarise(results))


def test_methods_are_checked() -> None:
    assert sketch_options("second-round@50") == {"compression": 50.0, "second_round": True}
    assert sketch_options("allreduce") is None
    with pytest.raises(ValueError, match="NAME@RATIO"):
        sketch_options("fetch@10")
