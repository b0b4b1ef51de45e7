"""A short private, sketched DDP training on real data, on this machine.

Starts two processes with torchrun (gloo on CPU; NCCL when GPUs are present), trains an MLP on
scikit-learn's handwritten digits with per-example clipping and Gaussian noise in sketch space
(20x smaller messages than allreduce), calibrated to the target epsilon, and prints the privacy
plan, a progress bar, the test accuracy and a final privacy report. Ledger, checkpoint and the
offline wandb run land in a fresh folder under --runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="ranks to start (default 2)")
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=4.0,
        help="epsilon to calibrate the noise for, at delta 1e-5 (default 4)",
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument(
        "--compression", type=float, default=20.0, help="bucket / table elements (default 20)"
    )
    parser.add_argument(
        "--colluding-ranks",
        type=int,
        default=0,
        help="ranks that may pool their noise shares against the others (default 0)",
    )
    parser.add_argument("--runs", default="runs", help="output folder (default runs)")


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        print("--nproc must be at least 1", file=sys.stderr)
        return 2
    run_dir = Path(args.runs) / time.strftime("demo-%Y%m%d-%H%M%S")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "sketchcomm.demo.private_training",
        f"--target-epsilon={args.target_epsilon}",
        f"--steps={args.steps}",
        f"--compression={args.compression}",
        f"--colluding-ranks={args.colluding_ranks}",
        f"--run-dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.setdefault("WANDB_SILENT", "true")
    print(f"run folder: {run_dir}", flush=True)
    return subprocess.call(command, env=env)
