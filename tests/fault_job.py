"""The private training job with one injected fault, for tests/test_faults.py (run under torchrun).

Runs :func:`sketchcomm.demo.private_training.main` unchanged, observing it from outside:

* every rank appends the index of each step it completed (after the optimizer applied the step's
  released sum) to ``FAULT_DIR/completed-rank<r>.log`` as ``<step> <restart count>``;
* ``FAULT_AT=<where>:<ranks>:<step>`` kills the ranks ``<ranks>`` (a comma separated list) with
  SIGKILL at step ``<step>``, once: each victim leaves ``FAULT_DIR/fired-rank<r>`` behind, and a
  fault whose victims have all fired is not injected again, so that a restart by torchrun or by
  hand with the same command runs clean. ``<where>`` is

  - ``between``: before the step starts, with no step in flight: every rank waits at a barrier,
    the victims die, and the other ranks block in a second barrier until torchrun stops them,
    so no rank starts the step;
  - ``release``: inside the communication hook of the step, after the ledger recorded the step
    and before the victim adds its noise and hands its table to the allreduce.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import sketchcomm.demo.private_training as job
import sketchcomm.privacy.hook as private_hook

FAULT_DIR = Path(os.environ["FAULT_DIR"])
RESTART = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
current_step = -1


def _fault() -> tuple[str, list[int], int] | None:
    spec = os.environ.get("FAULT_AT")
    if not spec:
        return None
    where, ranks, step = spec.split(":")
    return where, [int(r) for r in ranks.split(",")], int(step)


def _marker(rank: int) -> Path:
    return FAULT_DIR / f"fired-rank{rank}"


def _pending(victims: list[int]) -> bool:
    return not all(_marker(r).exists() for r in victims)


def _die() -> None:
    _marker(dist.get_rank()).touch()
    os.kill(os.getpid(), signal.SIGKILL)


class ObservedSchedule(list):
    """The job's list of Poisson batches; notes which step the loop is taking."""

    def __getitem__(self, step: Any) -> Any:
        global current_step
        current_step = step
        fault = _fault()
        if fault and fault[0] == "between" and fault[2] == step and _pending(fault[1]):
            dist.barrier()
            if dist.get_rank() in fault[1]:
                _die()
            dist.barrier()  # a victim is gone: this never completes
        return super().__getitem__(step)


def observed_batches(*args: Any, **kwargs: Any) -> ObservedSchedule:
    return ObservedSchedule(real_poisson_batches(*args, **kwargs))


def noise_or_die(table: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    fault = _fault()
    if (
        fault
        and fault[0] == "release"
        and fault[2] == current_step
        and dist.get_rank() in fault[1]
        and _pending(fault[1])
    ):
        _die()
    return real_add_noise(table, *args, **kwargs)


class LoggingReporter(job.PrivacyReporter):
    def log_step(self, *args: Any, **kwargs: Any) -> dict[str, float] | None:
        with open(FAULT_DIR / f"completed-rank{dist.get_rank()}.log", "a") as log:
            log.write(f"{current_step} {RESTART}\n")
        return super().log_step(*args, **kwargs)


real_poisson_batches = job.poisson_batches
real_add_noise = private_hook.add_noise
job.poisson_batches = observed_batches
job.PrivacyReporter = LoggingReporter
private_hook.add_noise = noise_or_die

if __name__ == "__main__":
    sys.exit(job.main())
