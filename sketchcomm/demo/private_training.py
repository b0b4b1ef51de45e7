"""Private, sketched DDP training of the digits MLP: the job behind ``sketchcomm demo`` and
``examples/train_dp.py``.

Run it under torchrun::

    torchrun --standalone --nproc_per_node=2 -m sketchcomm.demo.private_training --target-epsilon 4

Each rank draws its batches by Poisson sampling (:func:`poisson_batches`), the per-example
gradients are clipped and noised in sketch space by :func:`~sketchcomm.privacy.dp_sketch_hook`,
the ledger is written to ``RUN_DIR/ledger.json`` before each step is released, a checkpoint is
written to ``RUN_DIR/checkpoint.pt``, and rank 0 reports to wandb (offline without credentials)
and prints a privacy report at the end. A restarted run continues the model from the checkpoint
and the Poisson schedule at the ledger's step count (:func:`resume_step`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.demo.digits import accuracy, load_digits, make_mlp
from sketchcomm.privacy import DPSketchState, PrivacyBudgetExceeded, PrivacyLedger
from sketchcomm.report import PrivacyReporter, format_privacy_report
from sketchcomm.sketch import derive_seed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target-epsilon",
        type=float,
        default=4.0,
        help="epsilon the noise is calibrated for, also the enforced budget",
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (below 1/N)")
    parser.add_argument(
        "--accountant",
        choices=("rdp", "prv", "gdp"),
        default="rdp",
        help="Opacus accountant for calibration and the ledger",
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="expected global batch size; sample rate q = batch / N",
    )
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    parser.add_argument(
        "--compression", type=float, default=20.0, help="bucket elements per sketch table element"
    )
    parser.add_argument(
        "--topk-fraction",
        type=float,
        default=0.1,
        help="coordinates recovered per step, as a fraction of the bucket",
    )
    parser.add_argument(
        "--momentum", type=float, default=0.5, help="momentum kept in sketch space (FetchSGD)"
    )
    parser.add_argument("--hidden", type=int, default=512, help="hidden width of the MLP")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the model, the data shards and the hashes"
    )
    parser.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="seed of the Poisson sampling, for reproducible runs; by default it is drawn from "
        "the operating system, since the privacy guarantee assumes the sampling is secret",
    )
    parser.add_argument(
        "--run-dir",
        default="runs/private-digits",
        help="ledger, checkpoint and wandb files go here (resumed if present)",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between checkpoints"
    )
    parser.add_argument(
        "--colluding-ranks",
        type=int,
        default=0,
        help="t, the ranks that may pool their noise shares against the others' examples: the "
        "noise is calibrated so that the target epsilon holds towards them too (default 0: "
        "ranks trusted)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def poisson_batches(
    n: int,
    sample_rate: float,
    rank: int,
    world: int,
    seed: int,
    steps: int,
    sampling_seed: int | None = None,
) -> list[torch.Tensor]:
    """This rank's batches: every example of its shard (a seeded permutation split ``world``
    ways) is included in each step independently with probability ``sample_rate``.

    Each rank draws from its own generator, and empty batches are kept, so that every rank
    takes every step (Opacus's distributed sampler skips empty batches, which would put the ranks
    out of step). The inclusion draws are seeded from the operating system's entropy unless
    ``sampling_seed`` is given: the accountant's amplification by subsampling assumes that no one
    can tell which examples a step used, which a public seed would void. ``sampling_seed`` makes a
    run reproducible (tests, debugging); the guarantee then holds only while it stays secret.
    """
    shard = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[rank::world]
    if sampling_seed is None:
        generator_seed = secrets.randbits(63)
    else:
        generator_seed = derive_seed("poisson", sampling_seed, rank)
    generator = torch.Generator().manual_seed(generator_seed)
    return [shard[torch.rand(len(shard), generator=generator) < sample_rate] for _ in range(steps)]


def resume_step(checkpoint_step: int, ledger_steps: int) -> int:
    """The first step of the Poisson schedule that a (re)started run takes: the ledger's count.

    The ledger records step ``t`` (and persists it) before step ``t``'s noisy tables leave any
    process, and the checkpoint is written after the optimizer has applied a step, so after a
    crash ``checkpoint_step <= ledger_steps``. Steps ``checkpoint_step .. ledger_steps - 1`` were
    released, or were about to be, when the run stopped: they stay counted, their updates are
    lost with the process, and their batches are never drawn again. Running them again would
    release a second noisy sum of the same Poisson sample, which the accountant's composition of
    independently sampled steps does not cover; skipping them keeps every batch of the schedule
    released at most once and the ledger's count equal to the number of steps started.

    Raises:
        RuntimeError: if the ledger holds fewer steps than the checkpoint: the ledger file was
            lost or belongs to another run, and continuing would under-report the privacy spent.
    """
    if ledger_steps < checkpoint_step:
        raise RuntimeError(
            f"the ledger holds {ledger_steps} steps but the checkpoint was written after step "
            f"{checkpoint_step}: the ledger file is missing or belongs to another run, so the "
            "privacy already spent is unknown; refusing to continue"
        )
    return ledger_steps


def train(args: argparse.Namespace) -> dict[str, float]:
    """The training loop of one rank; returns the final figures (on every rank)."""
    rank = dist.get_rank()
    device = (
        torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    n = len(data.x_train)
    sample_rate = args.batch_size / n

    model = make_mlp(args.hidden, args.seed).to(device)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ledger = PrivacyLedger(
        accountant=args.accountant,
        delta=args.delta,
        budget=args.target_epsilon,
        path=run_dir / "ledger.json",
        writer=rank == 0,
        dataset_size=n,
        colluding_ranks=args.colluding_ranks,
    )
    # A resumed run keeps the noise multiplier it was planned with: running past the plan then
    # spends beyond the budget, which the ledger refuses.
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = (
        torch.load(checkpoint_path, map_location=device, weights_only=False)
        if checkpoint_path.exists()
        else None
    )
    noise = (
        {"noise_multiplier": checkpoint["hook"]["config"]["noise_multiplier"]}
        if checkpoint
        else {"target_epsilon": args.target_epsilon, "steps": args.steps}
    )
    state = DPSketchState(
        ledger,
        max_grad_norm=args.max_grad_norm,
        unit="example",
        sample_rate=sample_rate,
        dataset_size=n,
        compression=args.compression,
        topk_fraction=args.topk_fraction,
        momentum=args.momentum,
        colluding_ranks=args.colluding_ranks,
        seed=args.seed,
        **noise,
    )
    state.register(ddp_model)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr)

    checkpoint_step = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(checkpoint["hook"])
        checkpoint_step = checkpoint["step"]
    start = resume_step(checkpoint_step, ledger.steps)
    if rank == 0:
        print(state.describe(args.steps), flush=True)
        if start:
            print(
                f"resuming at step {start} from the checkpoint of step {checkpoint_step}; "
                f"ledger already holds {ledger.steps} steps (epsilon {ledger.epsilon:.3f})",
                flush=True,
            )

    batches = poisson_batches(
        n, sample_rate, rank, dist.get_world_size(), args.seed, args.steps, args.sampling_seed
    )
    reporter = PrivacyReporter(ledger, name=run_dir.name, dir=run_dir, config=vars(args), rank=rank)
    progress = range(start, args.steps)
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(progress, desc="private training", unit="step")
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    stopped = None
    for step in progress:
        index = batches[step]
        x, y = data.x_train[index].to(device), data.y_train[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        try:
            loss_fn(ddp_model(x), y).backward()
        except PrivacyBudgetExceeded as error:
            stopped = str(error)
            break
        optimizer.step()
        reporter.log_step(
            {
                "bytes_sent": state.stats.step_bytes_sent,
                "compression_ratio": state.stats.compression_ratio,
            }
        )
        if (step + 1) % args.checkpoint_every == 0 and rank == 0:
            _save(checkpoint_path, model, optimizer, state, step + 1)
    else:
        if rank == 0:
            _save(checkpoint_path, model, optimizer, state, args.steps)

    test_accuracy = accuracy(model.cpu(), data.x_test, data.y_test)
    if rank == 0:
        if stopped:
            print(f"stopped: {stopped}")
        print(f"test accuracy: {test_accuracy:.4f}")
        print(
            format_privacy_report(
                ledger,
                comm={
                    "bytes_sent_per_step": state.stats.step_bytes_sent,
                    "bytes_allreduce_per_step": state.stats.step_bytes_uncompressed,
                    "compression_ratio": state.stats.compression_ratio,
                },
            )
        )
    reporter.finish()
    return {"test_accuracy": test_accuracy, "epsilon": ledger.epsilon, "steps": ledger.steps}


def _save(path: Path, model: nn.Module, optimizer, state: DPSketchState, step: int) -> None:
    """Write the checkpoint atomically (a crash never leaves a half-written file)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "hook": state.state_dict(),
            "step": step,
        },
        tmp,
    )
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        train(args)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
