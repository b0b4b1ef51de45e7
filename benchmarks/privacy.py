r"""Privacy benchmark: test accuracy against epsilon, over real gloo ranks, on two tasks.

Every method trains the task's model (``--task``: the digits MLP, or a next-character MLP on the
standard library's pydoc text; :mod:`benchmarks.privacy_tasks`) with DDP on ``world``
processes joined by gloo, on batches drawn by Poisson sampling at rate ``q = batch_size / N``, for
``steps`` SGD steps (:mod:`benchmarks.privacy_runner`). The private methods release, per
step, the Poisson subsampled Gaussian mechanism with clipping norm ``C`` and the *same* noise
multiplier ``\sigma``, calibrated once per target epsilon with the chosen Opacus accountant for
``(q, steps, delta)``; each run's :class:`~sketchcomm.privacy.PrivacyLedger` enforces the target as
its budget and reports the epsilon spent. The unit of privacy is one training example
(add/remove-one adjacency). Methods (:data:`METHODS`):

* ``nonprivate``: plain allreduce of the gradient of the summed loss divided by ``q N``; the
  accuracy ceiling.
* ``sketch``: :class:`~sketchcomm.privacy.DPSketchState` at ``compression``: per-example Count
  Sketch tables clipped to ``C``, noise in sketch space, FetchSGD top-k recovery with sketch-space
  momentum and error.
* ``dpsgd``: the same hook with every bucket uncompressed (an exact one-row table per bucket), which
  is DP-SGD with per-bucket clipping thresholds.
* ``opacus``: DP-SGD by Opacus (``GradSampleModule``, ``DPOptimizer``, the same accountant) in one
  process, with the same ``\sigma``, ``C``, ``q`` and steps: an independent reference.
* ``sep-sketch``, ``sep-topk``, ``sep-randk``: noise in gradient space, then compression at the
  private sketch's bytes per step (:mod:`benchmarks.baselines`). ``sep-topk`` gives every
  rank its ``1/W`` share of the noise, like the others; but each rank's message is seen by the
  other ranks, and towards them it is DP only with noise multiplier ``\sigma / \sqrt W``, which
  favours this baseline. ``sep-topk-local`` has every rank add the full ``N(0, \sigma^2 C^2)``,
  which keeps the stated epsilon towards every observer of the messages.

Learning rate and momentum are set per task and method (:data:`TUNED`, chosen by
:func:`run_sweep`): a single step size cannot suit both a dense update and a top-k update with
error feedback. Momentum ``rho`` lives where each method needs it: in sketch space (``sketch``,
``sep-sketch``), in the local error feedback (``sep-topk``, ``sep-topk-local``), in the optimizer
(the others). Sketching and compression add no privacy; every epsilon comes from the noise.

Run it as ``python -m benchmarks.privacy`` (or mounted as a ``sketchcomm bench privacy``
command through :func:`configure` and :func:`run`); reports are written by
:mod:`benchmarks.privacy_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.privacy_config import METHODS, TASK_DEFAULTS, TUNED, BenchConfig
from benchmarks.privacy_report import markdown_table, plot_accuracy, summarize
from benchmarks.privacy_runner import run_privacy_bench, run_sweep
from benchmarks.privacy_tasks import TASKS

__all__ = [
    "METHODS",
    "TUNED",
    "BenchConfig",
    "configure",
    "main",
    "run",
    "run_privacy_bench",
    "run_sweep",
]

#: What ``--quick`` runs: one target epsilon, one seed and this many steps.
QUICK_EPSILON, QUICK_STEPS = 4.0, 30

_OPTION_HELP = {
    "steps": "optimizer steps",
    "batch_size": "expected global batch; sample rate q = batch / N",
    "max_grad_norm": "clipping norm C of one example",
    "hidden": "hidden width of the MLP",
    "compression": "bucket elements per sketch table element (also the baselines' byte budget)",
    "topk_fraction": "coordinates recovered per step by FetchSGD, fraction of the bucket",
    "delta": "delta of every epsilon",
    "colluding_ranks": "ranks that may pool their noise shares; the epsilons hold towards them",
}


def _default_help(name: str) -> str:
    """``"default 128"``, or per task where the tasks differ: ``"default: digits 64, text 256"``."""
    values = {task: getattr(BenchConfig.for_task(task), name) for task in TASKS}
    if len(set(values.values())) == 1:
        return f"default {next(iter(values.values())):g}"
    return "default: " + ", ".join(f"{task} {value:g}" for task, value in values.items())


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the ``privacy`` benchmark command."""
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default="digits",
        help="digits images or next-character text (default digits); sets the defaults below",
    )
    parser.add_argument(
        "--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help="target epsilons"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds per method")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds start here (default 0)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods"
    )
    digits = BenchConfig()
    for name, help_text in _OPTION_HELP.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(getattr(digits, name)),
            help=f"{help_text} ({_default_help(name)})",
        )
    for name in ("lr", "momentum"):
        parser.add_argument(
            f"--{name}",
            type=float,
            help=f"SGD {name} of every method (default: each method's own, see TUNED)",
        )
    parser.add_argument(
        "--accountant",
        choices=("rdp", "prv", "gdp"),
        default=digits.accountant,
        help="Opacus accountant for calibration and the ledgers (default rdp)",
    )
    parser.add_argument("--world", type=int, default=digits.world, help="ranks (default 2)")
    parser.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="seed the Poisson sampling, for a reproducible run that is NOT private (marked so in "
        "the JSON and the tables); by default every sampler is seeded from the operating system",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run in under two minutes: epsilon {QUICK_EPSILON:g}, one seed, "
        f"{QUICK_STEPS} steps",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the benchmark, the sweep at the first epsilon: every method on the "
        "lr x momentum GRID, then the sketch and DP-SGD under one-at-a-time variations (SWEEP)",
    )
    parser.add_argument("--json", metavar="PATH", help="write config, rows and summary as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the Markdown tables")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of accuracy against epsilon")
    parser.add_argument("--quiet", action="store_true", help="no line per finished run")


def _config(args: argparse.Namespace) -> BenchConfig:
    """The task's defaults overridden by the options given (``--quick`` sets the steps)."""
    names = [name for name in asdict(BenchConfig()) if name != "task"]
    given = {name: getattr(args, name) for name in names}
    if args.quick:
        given["steps"] = QUICK_STEPS
    return BenchConfig.for_task(args.task, **given)


def _machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpus} CPU cores ({platform.machine()}), torch {torch.__version__}, gloo"


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or the sweep), print the tables and write the requested files."""
    config = _config(args)
    counts = {
        "--seeds": args.seeds,
        "--world": config.world,
        "--steps": config.steps,
        "--batch-size": config.batch_size,
        "--hidden": config.hidden,
    }
    bad = [f"{name} must be at least 1" for name, value in counts.items() if value < 1]
    bad += [f"--epsilons must be positive, got {e:g}" for e in args.epsilons if not e > 0]
    if bad:
        print("; ".join(bad), file=sys.stderr)
        return 2
    epsilons = [QUICK_EPSILON] if args.quick else list(args.epsilons)
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    verbose = not args.quiet
    start = time.perf_counter()
    if args.sweep:
        rows = run_sweep(config, epsilons[0], seeds, verbose=verbose)
    else:
        rows = run_privacy_bench(epsilons, seeds, args.methods, config, verbose)
    summary = summarize(rows)
    tables = "\n\n".join(
        markdown_table(summary, config, metric) for metric in ("test_accuracy", "test_loss")
    )
    print(tables)
    report = {
        "config": asdict(config),
        "tuned": TUNED[config.task],
        "task_defaults": TASK_DEFAULTS[config.task],
        "epsilons": epsilons,
        "seeds": seeds,
        "noise_multipliers": {
            f"{r['epsilon_target']:g}": r["noise_multiplier"]
            for r in rows
            if r["epsilon_target"] is not None and r["label"] in ("", "base")
        },
        "private": config.private,
        "sampling": config.sampling(),
        "machine": _machine(),
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "summary": summary,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(tables + "\n")
    if args.plot:
        plot_accuracy(summary, args.plot, config)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
