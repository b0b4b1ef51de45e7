"""``python -m benchmarks private-models``: example-level private training of real models against
its baselines, in one invocation.

For each task — the byte-level GPT-2 of ``examples/train_private_lm.py`` and the GroupNorm CNN of
``examples/train_private_cnn.py`` — three runs with the same seeded model, data, epsilon, delta,
clipping norm, expected batch, steps and learning rate:

* ``private-sketch`` — the private sketch hook at ``--compression`` (20x), 2 gloo ranks under
  ``torchrun``, each drawing its own Poisson batch; RDP accountant, ``unit="example"``;
* ``opacus`` — Opacus DP-SGD in one process (``make_private`` with Poisson sampling and the same
  noise multiplier, calibrated by the same accountant for the same plan);
* ``allreduce`` — non-private DDP allreduce, 2 ranks, the same Poisson batches' sizes.

The table gives the held-out loss (and, for the CNN, the test accuracy), epsilon at delta, the
bytes each rank sends per step (Opacus runs in one process: none), the median step time after two
warm-up steps and its ratio to Opacus's. Printed as Markdown, then as JSON (``--json`` also writes
it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.arguments import positive_int
from sketchcomm.config import SketchConfig

CHECKOUT = Path(__file__).resolve().parents[1]
EXAMPLES = {"gpt2": "train_private_lm.py", "cnn": "train_private_cnn.py"}
RUNS = ("private-sketch", "opacus", "allreduce")
MODE = {"private-sketch": "private", "opacus": "opacus", "allreduce": "allreduce"}


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``bench private-models``."""
    add = parser.add_argument
    add("--tasks", nargs="+", choices=tuple(EXAMPLES), default=list(EXAMPLES), help="models")
    add("--gpt2-steps", type=positive_int, default=300, help="steps of the GPT-2 runs")
    add("--cnn-steps", type=positive_int, default=300, help="steps of the CNN runs")
    add("--gpt2-batch", type=positive_int, default=128, help="expected batch of the GPT-2 runs")
    add("--cnn-batch", type=positive_int, default=64, help="expected batch of the CNN runs")
    add("--target-epsilon", type=float, default=8.0, help="epsilon of each private run")
    add("--delta", type=float, default=1e-5, help="delta")
    add("--compression", type=float, default=20.0, help="sketch compression of the private run")
    add(
        "--min-compression-size",
        type=positive_int,
        default=SketchConfig.min_compression_size,
        help="buckets with fewer elements are privatised uncompressed (the CNN's one bucket is)",
    )
    add("--quick", action="store_true", help="tiny models, 4 steps (tests, smoke runs)")
    add("--sampling-seed", type=int, default=None, help="seed of the Poisson sampling")
    add("--json", type=Path, default=None, help="also write the JSON report here")
    add("--timeout", type=positive_int, default=1800, help="seconds allowed per run")


def _command(task: str, run: str, args: argparse.Namespace, steps: int) -> list[str]:
    script = str(CHECKOUT / "examples" / EXAMPLES[task])
    launcher = (
        [sys.executable]
        if run == "opacus"
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    )
    options = [
        "--mode",
        MODE[run],
        "--steps",
        str(steps),
        "--target-epsilon",
        str(args.target_epsilon),
        "--delta",
        str(args.delta),
        "--compression",
        str(args.compression),
        "--min-compression-size",
        str(args.min_compression_size),
    ]
    if not args.quick:  # --quick keeps the tiny examples' own batch
        options += ["--batch-size", str({"gpt2": args.gpt2_batch, "cnn": args.cnn_batch}[task])]
    if args.sampling_seed is not None:
        options += ["--sampling-seed", str(args.sampling_seed)]
    return [*launcher, script, *options, *(["--tiny"] if args.quick else [])]


def run_one(task: str, run: str, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """One run's ``RESULT`` line, parsed; raises ``RuntimeError`` with its output if it failed."""
    command = _command(task, run, args, steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(CHECKOUT)}
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        cwd=CHECKOUT,
        timeout=args.timeout,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{task}/{run} failed (exit {done.returncode}): {' '.join(command)}\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return {"task": task, "run": run, **json.loads(lines[-1][len("RESULT ") :])}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | run | eval loss (initial) | test accuracy | epsilon | bytes/step/rank "
        "| step time (ms) | vs Opacus |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        epsilon = "∞ (not private)" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        accuracy = f"{row['test_accuracy']:.3f}" if "test_accuracy" in row else "–"
        sent = "– (one process)" if row["run"] == "opacus" else f"{row['bytes_per_step']:,}"
        lines.append(
            f"| {row['task']} | {row['run']} | {row['eval_loss']:.3f} "
            f"({row['initial_eval_loss']:.3f}) | {accuracy} | {epsilon} | {sent} "
            f"| {1000 * row['step_time_s']:.1f} | {row['time_vs_opacus']:.2f}x |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run every task's three runs, print the Markdown table and the JSON report."""
    rows = []
    for task in args.tasks:
        steps = 4 if args.quick else {"gpt2": args.gpt2_steps, "cnn": args.cnn_steps}[task]
        results = [run_one(task, name, args, steps) for name in RUNS]
        opacus_time = next(r["step_time_s"] for r in results if r["run"] == "opacus")
        rows += [r | {"time_vs_opacus": r["step_time_s"] / opacus_time} for r in results]
    print(_table(rows))
    report = json.dumps({"rows": rows}, indent=2)
    print(report)
    if args.json is not None:
        args.json.write_text(report + "\n")
    return 0
