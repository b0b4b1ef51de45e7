r"""The communication methods of the accuracy benchmark, each with the bytes it sends per step.

A method is ``allreduce``, ``fp16``, ``powersgd@RANK`` or ``NAME@RATIO`` with ``NAME`` a key of
:data:`SKETCH_METHODS` (sketch options on top of ``compression=RATIO``):

``allreduce``
    DDP's own allreduce: every step sends the 4-byte fp32 gradient, ``4 D`` bytes for ``D``
    parameters.
``fp16``
    PyTorch's ``default_hooks.fp16_compress_hook``: the bucket cast to fp16, ``2 D`` bytes.
``powersgd@RANK``
    PyTorch's ``powerSGD_hook`` with its documented tuning: ``PowerSGDState(
    matrix_approximation_rank=RANK, start_powerSGD_iter=W, min_compression_rate=2,
    use_error_feedback=True, warm_start=True)``, ``W`` the warm-up (10 % of the steps, as
    PyTorch's documentation suggests, at least 2). A gradient of shape ``[n, ...]`` is viewed
    as an ``n x m`` matrix and sent as ``P`` (``n x r``) and ``Q`` (``m x r``) when
    ``n m >= 2 (n + m) r``, uncompressed otherwise; the bytes are counted from PowerSGD's own
    element counters (``total_numel_after_compression``), and during the warm-up from the
    allreduced bucket.
``NAME@RATIO``
    :class:`sketchcomm.SketchState`; the bytes are ``state.stats.step_bytes_sent``. ``default``
    is the state with nothing else set registered with ``state.register(ddp)`` (the hook sees
    the optimizer); ``unmoved`` is the same state registered with ``ddp.register_comm_hook``, so
    the optimizer's momentum stays where it is; ``second-round``, ``dense`` and ``dense3`` (3
    rows) the other recoveries; ``k1``, ``k3``, ``k10``, ``k30``, ``k50`` and ``k100`` the
    default with ``topk_fraction`` set to 0.01, 0.03, 0.1, 0.3, 0.5 and 1 (every coordinate).

Every method counts the bytes of the tensors each rank hands to its collectives in one step
(what ``SketchStats`` counts), not the algorithm's wire traffic.

>>> check_method("powersgd@4"), check_method("default@50")
('powersgd', 'default')
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from sketchcomm.hooks import SketchState, sketch_hook

__all__ = [
    "SKETCH_METHODS",
    "ByteCount",
    "RegisteredMethod",
    "check_method",
    "powersgd_warmup",
    "register_method",
    "sketch_options",
]

#: Sketch options of each sketch method, on top of ``compression``.
SKETCH_METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "unmoved": {},
    "second-round": {"second_round": True},
    "dense": {"recovery": "dense"},
    "dense3": {"recovery": "dense", "rows": 3},
    "k1": {"topk_fraction": 0.01},
    "k3": {"topk_fraction": 0.03},
    "k10": {"topk_fraction": 0.1},
    "k30": {"topk_fraction": 0.3},
    "k50": {"topk_fraction": 0.5},
    "k100": {"topk_fraction": 1.0},
}
#: Methods that take no ``@`` parameter.
PLAIN_METHODS = ("allreduce", "fp16")


def check_method(method: str) -> str:
    """The family of ``method`` (``allreduce``, ``fp16``, ``powersgd`` or a sketch name)."""
    if method in PLAIN_METHODS:
        return method
    name, _, value = method.partition("@")
    valid = name in SKETCH_METHODS or name == "powersgd"
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not valid or number <= 0 or (name == "powersgd" and not number.is_integer()):
        raise ValueError(
            f"method must be one of {PLAIN_METHODS}, powersgd@RANK (an integer) or NAME@RATIO "
            f"with NAME in {tuple(SKETCH_METHODS)}, got {method!r}"
        )
    return name


def sketch_options(method: str) -> dict[str, Any] | None:
    """``SketchState`` options of a sketch ``method`` (``None`` for any other method)."""
    name = check_method(method)
    if name not in SKETCH_METHODS:
        return None
    return {"compression": float(method.partition("@")[2]), **SKETCH_METHODS[name]}


def powersgd_warmup(steps: int) -> int:
    """PowerSGD's ``start_powerSGD_iter`` for a run of ``steps``: 10 % of them, at least 2."""
    return max(2, steps // 10)


class ByteCount:
    """Bytes handed to collectives: ``total`` since the start, ``step`` in the last step.

    >>> count = ByteCount()
    >>> count.add(400); count.end_step(); count.add(100); count.end_step()
    >>> count.step, count.total
    (100, 500)
    """

    def __init__(self) -> None:
        self.total = 0
        self.step = 0
        self.pending = 0

    def add(self, nbytes: int) -> None:
        self.pending += nbytes

    def end_step(self) -> None:
        self.step, self.pending = self.pending, 0
        self.total += self.step


class RegisteredMethod:
    """A method registered on a DDP model: its hook state and what it sent.

    ``end_step()`` closes one optimizer step's count; ``step_bytes`` and ``total_bytes`` are
    the last step's and all steps' bytes per rank; ``describe()`` what the method chose.
    """

    def __init__(self, method: str, fixed_bytes: Callable[[], int] | None = None) -> None:
        self.method = method
        self.count = ByteCount()
        self.fixed_bytes = fixed_bytes
        self.sketch: SketchState | None = None

    def end_step(self) -> None:
        if self.sketch is not None:
            self.count.add(self.sketch.stats.step_bytes_sent)
        elif self.fixed_bytes is not None:
            self.count.add(self.fixed_bytes())
        self.count.end_step()

    @property
    def step_bytes(self) -> int:
        return self.count.step

    @property
    def total_bytes(self) -> int:
        return self.count.total

    def describe(self) -> str | None:
        return None if self.sketch is None else self.sketch.describe()


def counted_fp16_hook(
    count: ByteCount, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """``fp16_compress_hook`` on the default group, counting the fp16 bucket's bytes."""
    count.add(bucket.buffer().numel() * 2)
    return default_hooks.fp16_compress_hook(None, bucket)


def counted_powersgd_hook(
    state: tuple[powerSGD_hook.PowerSGDState, ByteCount], bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """``powerSGD_hook``, counting the elements PowerSGD itself says it sends (4 bytes each).

    PowerSGD issues ``Q``'s allreduce from the callback of ``P``'s, which on gloo can interleave
    with the next bucket's allreduce in a different order on each rank (a collective mismatch):
    the exchange of each bucket is waited for before the hook returns.
    """
    power, count = state
    buffer = bucket.buffer()
    warming = power.iter < power.start_powerSGD_iter
    before = power.total_numel_after_compression
    future = powerSGD_hook.powerSGD_hook(power, bucket)
    sent = buffer.numel() if warming else power.total_numel_after_compression - before
    count.add(sent * buffer.element_size())
    future.wait()
    return future


def register_method(method: str, ddp: DDP, steps: int) -> RegisteredMethod:
    """Register ``method``'s hook on ``ddp`` for a run of ``steps`` optimizer steps."""
    family = check_method(method)
    if family == "allreduce":
        dense_bytes = sum(p.numel() * p.element_size() for p in ddp.parameters())
        return RegisteredMethod(method, fixed_bytes=lambda: dense_bytes)
    registered = RegisteredMethod(method)
    if family == "fp16":
        ddp.register_comm_hook(registered.count, counted_fp16_hook)
    elif family == "powersgd":
        power = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=int(method.partition("@")[2]),
            start_powerSGD_iter=powersgd_warmup(steps),
            min_compression_rate=2,
            use_error_feedback=True,
            warm_start=True,
        )
        ddp.register_comm_hook((power, registered.count), counted_powersgd_hook)
    else:
        state = SketchState(**sketch_options(method))
        if family == "unmoved":
            ddp.register_comm_hook(state, sketch_hook)
        else:
            state.register(ddp)
        registered.sketch = state
    return registered
