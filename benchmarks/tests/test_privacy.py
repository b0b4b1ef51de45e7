"""The privacy benchmark in --quick mode on both tasks, the text task's data and model, and the
separate-noise baseline hooks against one-process references on real gloo ranks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import torch
from distributed import run_ranks
from opacus.accountants import RDPAccountant
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.baselines import SeparateNoiseState, random_coordinates
from benchmarks.char_lm import load_char_text
from benchmarks.privacy import METHODS, configure, run
from benchmarks.privacy_config import BenchConfig
from benchmarks.privacy_report import markdown_table, summarize
from benchmarks.privacy_runner import poisson_batches, sampler_seed
from benchmarks.privacy_tasks import (
    TEXT_CONTEXT,
    TEXT_EXAMPLES,
    OneHot,
    load_task,
    make_model,
    next_char_pairs,
)
from sketchcomm.demo.digits import load_digits, make_mlp
from sketchcomm.privacy import PrivacyLedger
from sketchcomm.privacy.capture import PerExampleGradients

CLIP, PER_RANK, Q, N = 0.5, 8, 16 / 1437, 1437


def _canonical_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in reversed(list(model.parameters()))])


def baseline_worker(rank: int, world: int) -> dict:
    """Each compressor on one step of 8 examples per rank; noise off, then noise on for random-k
    (also with per-message noise)."""
    data = load_digits()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    runs = [
        ("sketch", 0.0, False),
        ("topk", 0.0, False),
        ("randk", 0.0, False),
        ("randk", 2.0, False),
        ("randk", 2.0, True),
    ]
    for compressor, sigma, per_message in runs:
        model = DDP(make_mlp(hidden=32, seed=3))
        state = SeparateNoiseState(
            PrivacyLedger("rdp", 1e-5),
            CLIP,
            compressor,
            per_message_noise=per_message,
            sample_rate=Q,
            dataset_size=N,
            noise_multiplier=sigma,
            compression=5,
            min_compression_size=1000,
            topk_fraction=0.05,
        )
        state.register(model)
        loss = nn.functional.cross_entropy(
            model(data.x_train[rows]), data.y_train[rows], reduction="sum"
        )
        loss.backward()
        bs = state.buckets[0]
        results[(compressor, sigma, per_message)] = {
            "update": _canonical_grad(model.module),
            "key": bs.layout,
            "k": bs.topk,
            "sketch": bs.sketch,
            "normalizer": state.normalizer,
            "steps": state.ledger.steps,
            "bytes": state.stats.step_bytes_sent,
            "buckets": len(state.buckets),
        }
    return results


def _clipped_sums(world: int) -> list[torch.Tensor]:
    """Per rank, the sum of its examples' gradients clipped to ``CLIP``, by autograd one example
    at a time (one bucket, so the bucket's threshold is ``CLIP``)."""
    data = load_digits()
    model = make_mlp(hidden=32, seed=3)
    sums = []
    for rank in range(world):
        total = 0.0
        for i in range(rank * PER_RANK, (rank + 1) * PER_RANK):
            model.zero_grad()
            nn.functional.cross_entropy(
                model(data.x_train[i : i + 1]), data.y_train[i : i + 1], reduction="sum"
            ).backward()
            g = _canonical_grad(model)
            total = total + g * min(1.0, CLIP / (g.norm().item() + 1e-6))
        sums.append(total)
    return sums


@pytest.fixture(scope="module")
def baselines() -> tuple[dict, list[torch.Tensor]]:
    results = run_ranks(baseline_worker, 2)
    for key, value in results[0].items():
        assert torch.allclose(value["update"], results[1][key]["update"]), "ranks disagree"
    return results[0], _clipped_sums(2)


def test_baselines_one_bucket_one_step(baselines: tuple[dict, list[torch.Tensor]]) -> None:
    results, _ = baselines
    for result in results.values():
        assert result["buckets"] == 1 and result["steps"] == 1
    sketch = results[("sketch", 0.0, False)]["sketch"]
    table_bytes = 4 * sketch.rows * sketch.columns
    assert not sketch.is_exact
    assert results[("sketch", 0.0, False)]["bytes"] == table_bytes
    assert results[("randk", 0.0, False)]["bytes"] == table_bytes
    assert table_bytes - 4 <= results[("topk", 0.0, False)]["bytes"] <= table_bytes


def test_sketch_baseline_matches_reference(baselines: tuple[dict, list[torch.Tensor]]) -> None:
    """Noise off, no momentum, first step: FetchSGD top-k of the sketch of the summed clipped
    gradients, divided by q N."""
    results, sums = baselines
    result = results[("sketch", 0.0, False)]
    sketch = result["sketch"]
    indices, values = sketch.heavy_hitters(sketch.sketch(sums[0] + sums[1]), result["k"])
    expected = torch.zeros(sketch.dim)
    expected[indices] = values / result["normalizer"]
    torch.testing.assert_close(result["update"], expected, rtol=1e-4, atol=1e-6)


def test_topk_baseline_matches_reference(baselines: tuple[dict, list[torch.Tensor]]) -> None:
    """Noise off, first step: the sum of each rank's top-k of its clipped gradient sum."""
    results, sums = baselines
    result = results[("topk", 0.0, False)]
    sketch = results[("sketch", 0.0, False)]["sketch"]
    k = sketch.rows * sketch.columns // 2
    expected = torch.zeros(sketch.dim)
    for total in sums:
        indices = total.abs().topk(k).indices
        expected[indices] += total[indices]
    torch.testing.assert_close(result["update"], expected / result["normalizer"])


def test_randk_baseline_matches_reference(baselines: tuple[dict, list[torch.Tensor]]) -> None:
    """Noise off: the one-process random-k of the summed clipped gradients, scaled by d / k."""
    results, sums = baselines
    result = results[("randk", 0.0, False)]
    sketch = results[("sketch", 0.0, False)]["sketch"]
    d, k = sketch.dim, sketch.rows * sketch.columns
    coordinates = random_coordinates(0, result["key"], 0, d, k)
    expected = torch.zeros(d)
    expected[coordinates] = (sums[0] + sums[1])[coordinates] * d / (k * result["normalizer"])
    torch.testing.assert_close(result["update"], expected)


def test_randk_noise_scale(baselines: tuple[dict, list[torch.Tensor]]) -> None:
    """The shares add up to N(0, sigma^2 C^2) per released value; per-message noise gives W
    times the variance. Checked on the k released values, scaled back."""
    results, _ = baselines
    clean = results[("randk", 0.0, False)]["update"]
    sketch = results[("sketch", 0.0, False)]["sketch"]
    d, k = sketch.dim, sketch.rows * sketch.columns
    for per_message, expected in ((False, 2.0 * CLIP), (True, 2.0 * CLIP * math.sqrt(2))):
        result = results[("randk", 2.0, per_message)]
        released = result["update"] != clean
        assert released.sum().item() == k
        noise = (result["update"] - clean)[released] * k * result["normalizer"] / d
        assert noise.std().item() == pytest.approx(expected, rel=0.15)


def test_bad_configuration() -> None:
    ledger = PrivacyLedger("rdp", 1e-5)
    common = {"sample_rate": Q, "dataset_size": N, "noise_multiplier": 1.0}
    with pytest.raises(ValueError, match="compressor"):
        SeparateNoiseState(ledger, 1.0, "quantize", **common)
    with pytest.raises(ValueError, match="momentum"):
        SeparateNoiseState(ledger, 1.0, "randk", momentum=0.9, **common)
    with pytest.raises(ValueError, match="unit"):
        SeparateNoiseState(PrivacyLedger("rdp", 1e-5, unit="rank"), 1.0, "topk", unit="rank")


@pytest.mark.slow
def test_quick_benchmark(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    configure(parser)
    argv = [
        "--quick",
        "--quiet",
        "--hidden",
        "64",
        "--json",
        str(tmp_path / "bench.json"),
        "--markdown",
        str(tmp_path / "bench.md"),
    ]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(tmp_path / "bench.png")]
    assert run(parser.parse_args(argv)) == 0

    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    assert {row["method"] for row in rows} == set(METHODS)
    assert len(rows) == len(METHODS)
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["steps"] == 30
        if row["method"] == "nonprivate":
            assert row["epsilon"] is None and row["epsilon_target"] is None
        else:
            assert row["epsilon_target"] == 4.0
            assert 0.0 < row["epsilon"] <= row["epsilon_target"]
            assert row["noise_multiplier"] == report["noise_multipliers"]["4"]
    by_method = {row["method"]: row for row in rows}
    table = by_method["sketch"]["bytes_per_step"]
    assert by_method["sep-sketch"]["bytes_per_step"] == by_method["sep-randk"]["bytes_per_step"]
    assert by_method["sep-sketch"]["bytes_per_step"] == table
    assert by_method["sep-topk"]["bytes_per_step"] <= table
    assert by_method["dpsgd"]["bytes_per_step"] == by_method["nonprivate"]["bytes_per_step"]
    assert table < by_method["dpsgd"]["bytes_per_step"]
    markdown = (tmp_path / "bench.md").read_text()
    assert all(f"| {method} |" in markdown for method in METHODS)
    if "--plot" in argv:
        assert (tmp_path / "bench.png").stat().st_size > 0


def test_next_char_pairs_are_the_preceding_characters() -> None:
    ids = torch.arange(100, 120)
    contexts, targets = next_char_pairs(ids, 3, torch.tensor([3, 10, 19]))
    for row, t in enumerate((3, 10, 19)):
        assert contexts[row].tolist() == list(range(100 + t - 3, 100 + t))
        assert targets[row].item() == 100 + t
    with pytest.raises(ValueError, match="positions"):
        next_char_pairs(ids, 3, torch.tensor([2]))
    with pytest.raises(ValueError, match="context"):
        next_char_pairs(ids, 0, torch.tensor([5]))


def test_text_task_data() -> None:
    """Every training pair is a context and its next character somewhere in the training text,
    every test pair one of the held-out text, in order."""
    data, text = load_task("text"), load_char_text()
    assert data.train_size == TEXT_EXAMPLES and data.classes == text.vocab_size
    assert data.x_train.shape == (TEXT_EXAMPLES, TEXT_CONTEXT)
    windows = text.train.unfold(0, TEXT_CONTEXT + 1, 1)
    pairs = torch.cat((data.x_train[:10], data.y_train[:10, None]), dim=1)
    for pair in pairs:
        assert (windows == pair).all(1).any()
    assert len(data.y_test) == len(text.test) - TEXT_CONTEXT
    assert data.x_test[0].tolist() == text.test[:TEXT_CONTEXT].tolist()
    assert data.y_test[-1].item() == text.test[-1].item()


def test_text_model_per_example_gradients() -> None:
    """The text model trains only nn.Linear layers, so per-example capture accepts it, and the
    captured gradients of each example equal autograd on that example alone."""
    data = load_task("text")
    model = make_model("text", hidden=16, seed=0)
    x, y = data.x_train[:4], data.y_train[:4]
    one_hot = OneHot(data.classes)(x)
    assert one_hot.shape == (4, TEXT_CONTEXT * data.classes)
    assert torch.equal(one_hot, nn.functional.one_hot(x, data.classes).flatten(1).float())
    capture = PerExampleGradients(model)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    samples = {p: capture.pop(p) for p in model.parameters()}
    capture.remove()
    for i in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for p in model.parameters():
            torch.testing.assert_close(samples[p][i], p.grad.flatten())


def test_task_defaults_and_bad_settings() -> None:
    text = BenchConfig.for_task("text", steps=None, hidden=32)
    assert text.task == "text" and text.hidden == 32 and text.steps == 128
    assert text.delta < 1.0 / TEXT_EXAMPLES
    assert BenchConfig.for_task("digits") == BenchConfig()
    with pytest.raises(ValueError, match="task"):
        BenchConfig.for_task("images")
    with pytest.raises(ValueError, match="widht"):
        BenchConfig.for_task("text", widht=3)
    with pytest.raises(ValueError, match="metric"):
        markdown_table([], text, metric="perplexity")


@pytest.mark.slow
def test_quick_text_benchmark(tmp_path) -> None:
    """The text task's quick mode: accuracies above chance, and the private sketch's recorded
    epsilon equal to Opacus's RDP accountant for the same (sigma, q, steps)."""
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(
        [
            "--task",
            "text",
            "--quick",
            "--quiet",
            "--methods",
            "nonprivate",
            "sketch",
            "sep-topk",
            "--json",
            str(tmp_path / "bench.json"),
            "--markdown",
            str(tmp_path / "bench.md"),
        ]
    )
    assert run(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    config, rows = report["config"], report["rows"]
    assert config["task"] == "text" and config["steps"] == 30
    assert {row["method"] for row in rows} == {"nonprivate", "sketch", "sep-topk"}
    chance = 1.0 / load_task("text").classes
    for row in rows:
        assert row["task"] == "text"
        assert math.isfinite(row["test_loss"])
        assert chance < row["test_accuracy"] <= 1.0
    sketch = next(row for row in rows if row["method"] == "sketch")
    q = config["batch_size"] / TEXT_EXAMPLES
    assert sketch["sample_rate"] == q
    accountant = RDPAccountant()
    accountant.history = [(sketch["noise_multiplier"], q, config["steps"])]
    expected = accountant.get_epsilon(config["delta"])
    assert sketch["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert sketch["epsilon"] <= 4.0
    markdown = (tmp_path / "bench.md").read_text()
    assert "Test accuracy in %" in markdown and "Test cross-entropy in nats" in markdown
    assert markdown.count("| sketch | ") == 2


def _batches_twice(rank: int, world: int) -> list[bool]:
    """Per configuration (secret, seeded): whether two samplers of the same run and rank draw
    the same batches."""
    same = []
    for config in (BenchConfig(steps=4), BenchConfig(steps=4, sampling_seed=7)):
        first, second = (poisson_batches(config, 0, N, 64 / N) for _ in range(2))
        same.append(all(torch.equal(a, b) for a, b in zip(first, second, strict=True)))
    return same


def test_poisson_sampling_is_secret_unless_seeded() -> None:
    """By default every sampler is seeded from the operating system, so two samplers of the
    same run draw different batches; ``sampling_seed`` makes them reproducible (and the run
    not private)."""
    assert run_ranks(_batches_twice, 2) == [[False, True], [False, True]]
    seeded = BenchConfig(sampling_seed=7)
    assert sampler_seed(seeded, 0, 1) == sampler_seed(seeded, 0, 1) != sampler_seed(seeded, 0, 0)
    assert BenchConfig().private and not seeded.private
    row = {
        "label": "",
        "method": "sketch",
        "epsilon_target": 4.0,
        "epsilon": 3.9,
        "bytes_per_step": 8,
        "test_accuracy": 0.5,
        "test_loss": 1.0,
    }
    summary = summarize([row])
    assert "NOT PRIVATE" not in markdown_table(summary, BenchConfig())
    assert markdown_table(summary, seeded).endswith(f"**{seeded.sampling()}.**")


@pytest.mark.slow
def test_a_seeded_run_is_marked_not_private(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    configure(parser)
    argv = [
        "--quiet",
        "--methods",
        "sketch",
        "--epsilons",
        "4",
        "--seeds",
        "1",
        "--steps",
        "3",
        "--hidden",
        "16",
        "--json",
        str(tmp_path / "bench.json"),
        "--sampling-seed",
        "7",
    ]
    assert run(parser.parse_args(argv)) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["private"] is False and report["config"]["sampling_seed"] == 7
    assert report["sampling"].startswith("NOT PRIVATE: Poisson sampling seeded by --sampling-seed")
    assert "**NOT PRIVATE: Poisson sampling seeded" in capsys.readouterr().out
