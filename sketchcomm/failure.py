"""The failure path of the bucket-hook engine (:mod:`sketchcomm.engine`).

A rank whose hook raises sends all-zero messages for the rest of the step, each carrying its
error's code in its slot of a per-rank flag vector; every rank reads the flags from the exchanged
message. :class:`StepGuard` collects one step's bucket outcomes and hands them to DDP only once
every bucket of the step has arrived, so that a failed step clears its raw gradients on every rank
before any error (or any result) reaches DDP.

>>> error_name(error_code(ValueError("bad input")))
'ValueError'
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FLAGGED_ERRORS", "RemoteHookError", "StepGuard", "error_code", "error_name"]

#: Error types a flag can name; any other is reported as ``Exception``.
FLAGGED_ERRORS = (
    "PrivacyBudgetExceeded",
    "LedgerError",
    "ValueError",
    "RuntimeError",
    "TypeError",
    "FloatingPointError",
    "KeyError",
    "IndexError",
    "MemoryError",
    "RemoteHookError",
)


class RemoteHookError(RuntimeError):
    """Raised on every rank whose hook ran fine when another rank's hook raised in the same step:
    the message names that rank and its error type; that rank's own error gives the cause.

    >>> isinstance(RemoteHookError("rank 1 raised ValueError"), RuntimeError)
    True
    """


def error_code(error: BaseException) -> int:
    """The flag of ``error``'s type: ``1 + `` its place in :data:`FLAGGED_ERRORS`, or one more."""
    name = type(error).__name__
    return FLAGGED_ERRORS.index(name) + 1 if name in FLAGGED_ERRORS else len(FLAGGED_ERRORS) + 1


def error_name(code: int) -> str:
    """The type name a flag stands for."""
    return FLAGGED_ERRORS[code - 1] if code <= len(FLAGGED_ERRORS) else "Exception"


class StepGuard:
    """The buckets of one backward pass: who failed, and every bucket's outcome, handed to DDP
    together once every bucket of the step has been exchanged (so that a failed step can clear
    its gradients before DDP copies anything into them).

    >>> guard = StepGuard(threading.Lock(), discard_step=lambda: None)
    >>> gate, outcome = torch.futures.Future(), [torch.ones(2)]
    >>> guard.arrive(gate, outcome)
    >>> guard.expect(buckets=1)  # the step's last bucket has arrived: outcomes are released
    >>> gate.done(), guard.failed
    (True, False)
    """

    def __init__(self, lock: threading.Lock, discard_step: Callable[[], None]) -> None:
        self.lock, self.discard_step = lock, discard_step
        self.local_error: Exception | None = None
        self.remote: tuple[int, str] | None = None
        self.expected: int | None = None
        self.arrived = 0
        self.discarded = False
        self.outcomes: list[tuple[torch.futures.Future, list]] = []
        self.buffers: list[Tensor] = []
        self.parameters: list[Tensor] = []

    @property
    def failed(self) -> bool:
        return self.local_error is not None or self.remote is not None

    def expect(self, buckets: int) -> None:
        """The step has ``buckets`` buckets (known at its last bucket)."""
        with self.lock:
            self.expected = buckets
            self._release_if_complete()

    def arrive(self, gate: torch.futures.Future, outcome: list) -> None:
        """A bucket's exchange has arrived and ``outcome[0]`` holds its result, error or None."""
        with self.lock:
            self.arrived += 1
            self.outcomes.append((gate, outcome))
            self._release_if_complete()

    def _release_if_complete(self) -> None:
        if self.expected is None or self.arrived < self.expected:
            return
        if self.failed:
            self._discard()
        # Drop the step's references before waking DDP: once a gate is set, the training loop
        # may run on while this callback thread is still here.
        outcomes = list(self.outcomes)
        self.outcomes.clear()
        self.buffers.clear()
        self.parameters.clear()
        for gate, outcome in outcomes:
            if self.failed:
                outcome[0] = self.error()
            gate.set_result(torch.empty(0))

    def discard(self) -> None:
        """Clear the step's raw gradients now (a failing rank, before it raises)."""
        with self.lock:
            self._discard()

    def _discard(self) -> None:
        if self.discarded:
            return
        self.discarded = True
        with torch.no_grad():
            for _, outcome in self.outcomes:
                if isinstance(outcome[0], Tensor):
                    outcome[0].zero_()
            for buffer in self.buffers:
                buffer.zero_()
        for parameter in self.parameters:
            parameter.grad = None
        self.discard_step()

    def error(self) -> Exception:
        """The error every bucket of a failed step raises on this rank."""
        if self.local_error is not None:
            return self.local_error
        rank, name = self.remote if self.remote is not None else (-1, "Exception")
        return RemoteHookError(
            f"rank {rank} raised {name} in the communication hook; that rank's own error gives "
            "the cause. The step was abandoned on every rank: nothing was applied and its "
            "gradients were cleared"
        )
