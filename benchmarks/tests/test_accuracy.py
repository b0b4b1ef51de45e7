"""``python -m benchmarks.accuracy`` in quick mode: real gloo ranks, a few steps.

During the first ``start_iter`` iterations the sketch hook allreduces, so a sketched run that
stops there equals allreduce's run of the same seed exactly (same initialisation, same batches):
that checks the harness. One step more and the hook has seen the optimizer and says what it chose.
The GPT-2 baselines are checked against the bytes their definitions imply (PowerSGD's from its
documented compression rule on the model's parameter shapes); the digits CNN's allreduce run
against one process training on both ranks' batches at once.
"""

from __future__ import annotations

import doctest
import importlib
import math
from pathlib import Path

import pytest
import torch

from benchmarks.accuracy import LEARNING_RATES, Run, compare, markdown, summarise
from benchmarks.accuracy_frontier import (
    family_lines,
    frontier_markdown,
    load_results,
    plot_frontier,
)
from benchmarks.accuracy_methods import check_method, powersgd_warmup, sketch_options
from benchmarks.byte_lm import make_gpt2
from benchmarks.digits_cnn import image_batches, image_loss, load_digit_images, make_digits_cnn


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


def powersgd_elements(shapes: list[torch.Size], rank: int) -> int:
    """Elements PowerSGD sends for gradients of ``shapes``, from its documented rule: an
    ``n x m`` view (``n = shape[0]``) goes as ``P`` and ``Q`` when ``n m >= 2 (n + m) r``."""
    total = 0
    for shape in shapes:
        n = shape[0]
        m = math.prod(shape) // n
        r = min(n, m, rank)
        total += (n + m) * r if n * m >= 2 * (n + m) * r else n * m
    return total


def test_gpt2_baselines_send_what_they_claim_and_train(tmp_path: Path) -> None:
    steps = 3
    methods = ["allreduce", "fp16", "powersgd@1", "default@20"]
    runs = [Run(0, "sgd", m, steps, model="gpt2", eval_batches=2) for m in methods]
    progress = tmp_path / "progress.jsonl"
    results = compare(runs, progress=str(progress))
    by_method = {r["method"]: r for r in results}
    shapes = [p.shape for p in make_gpt2(256, seed=0).parameters()]
    dense = 4 * sum(math.prod(shape) for shape in shapes)
    assert by_method["allreduce"]["step_bytes"] == dense
    assert by_method["fp16"]["step_bytes"] == dense // 2
    # Two warm-up steps of plain allreduce, then one compressed step.
    assert powersgd_warmup(steps) == 2
    assert by_method["powersgd@1"]["step_bytes"] == 4 * powersgd_elements(shapes, 1)
    assert by_method["powersgd@1"]["mean_step_bytes"] == pytest.approx(
        (2 * dense + 4 * powersgd_elements(shapes, 1)) / 3
    )
    assert by_method["default@20"]["ratio"] > 15.0
    reference = by_method["allreduce"]["eval_loss"]
    assert by_method["fp16"]["eval_loss"] == pytest.approx(reference, rel=1e-3)
    for r in results:
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] < math.log(256)
    assert load_results(progress) == results
    rows = summarise(results)
    table = frontier_markdown(rows)
    assert "| gpt2 | sgd | fp16 | " in table and "| 2.0x |" in table
    lines = family_lines(rows, "sgd")
    assert set(lines) == {"allreduce", "fp16", "powersgd", "default"}
    figure = tmp_path / "frontier.png"
    plot_frontier(rows, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_methods_are_checked() -> None:
    assert check_method("powersgd@8") == "powersgd" and check_method("fp16") == "fp16"
    assert sketch_options("powersgd@8") is None
    for bad in ("powersgd@1.5", "powersgd", "default@0", "fp8"):
        with pytest.raises(ValueError, match="powersgd@RANK"):
            check_method(bad)


def test_cnn_allreduce_run_is_one_process_on_both_ranks_batches() -> None:
    steps, batch = 6, 8
    results = compare(
        [
            Run(1, "sgd", m, steps, model="cnn", batch_size=batch)
            for m in ("allreduce", "default@20")
        ]
    )
    images = load_digit_images()
    model = make_digits_cnn(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATES[("cnn", "sgd")], momentum=0.9)
    ranks = [image_batches(images.x_train, images.y_train, batch, seed=1, rank=r) for r in (0, 1)]
    for _ in range(steps):
        (x0, y0), (x1, y1) = (next(b) for b in ranks)
        optimizer.zero_grad()
        image_loss(model, (torch.cat([x0, x1]), torch.cat([y0, y1]))).backward()
        optimizer.step()
    with torch.no_grad():
        reference = image_loss(model, (images.x_test, images.y_test)).item()
    allreduce, sketched = results
    assert allreduce["eval_loss"] == pytest.approx(reference, rel=1e-5)
    assert reference < math.log(10)
    assert sketched["ratio"] > 15.0 and math.isfinite(sketched["eval_loss"])


@pytest.mark.parametrize("module", ["benchmarks.byte_lm", "benchmarks.digits_cnn"])
def test_model_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
