r"""A toolkit for DDP communication hooks that send something other than the gradient bucket.

Every hook in this package runs the same protocol for each bucket:

    layout -> bucket state -> message -> exchange -> failure and finite checks -> decode -> stats

[`HookState`][sketchcomm.engine.HookState] holds what the protocol keeps between buckets (process
group, the parameters it is bound to, per-bucket state, statistics);
[`HookState.open()`][sketchcomm.engine.HookState.open] starts a bucket and returns a
[`BucketContext`][sketchcomm.engine.BucketContext], whose methods are the remaining steps. A hook is
then a few lines: what makes the message and how the exchanged message is decoded (see
[`sketchcomm.sketch_hook()`][sketchcomm.sketch_hook],
[`sketchcomm.privacy.dp_sketch_hook()`][sketchcomm.privacy.dp_sketch_hook] and the benchmark
baselines)::

    def my_hook(state, bucket):
        context = state.open(bucket)
        message = context.build(numel, lambda: make_message(context))
        return context.allreduce(message, lambda summed: decode(context, summed))

Failure path. A hook that raises on one rank only (bad input, a refused privacy budget, a bug)
would leave the other ranks waiting in a collective until the process group's timeout. Instead,
[`BucketContext.build()`][sketchcomm.engine.BucketContext.build] catches the error: the rank sends
an all-zero message (nothing of its data) for this bucket and every later bucket of the step, and
every message carries one flag per rank (the code of the error's type, 0 when fine). Every rank sees
the flags: a failing rank raises its own error from the step's last bucket, the others raise
[`RemoteHookError`][sketchcomm.engine.RemoteHookError] naming the failing rank and its error type.
Before the error reaches the caller, the step's raw gradients are discarded on every rank
(``p.grad = None``, bucket buffers and results zeroed,
[`HookState.discard_step()`][sketchcomm.engine.HookState.discard_step]).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sketchcomm.bucket_states import bucket_state_for, split_bucket
from sketchcomm.buckets import BucketLayout, BucketState
from sketchcomm.failure import RemoteHookError, StepGuard, error_code, error_name
from sketchcomm.finite import tensor_is_finite
from sketchcomm.sketch import CountSketch
from sketchcomm.stats import SketchStats

__all__ = ["BucketContext", "HookState", "RemoteHookError", "resolve_group"]


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or the default (world) group when None."""
    return group if group is not None else dist.group.WORLD


class HookState:
    """What a bucket hook keeps between buckets and steps.

    Subclasses say how a bucket's state is made (`new_bucket_state()`) and which numbers every
    rank must agree on (`agreement_fields()`). ``nonfinite`` is ``"propagate"`` (a bucket whose
    exchanged message is not finite becomes NaN) or ``"raise"``. ``buckets`` maps DDP's bucket
    indices to their states, ``held`` keeps states a rebuild displaced until the step after the
    first on a newly bound model (see [`sketchcomm.bucket_states`][sketchcomm.bucket_states]);
    ``plain_parts`` says whether the hook may send part of a bucket uncompressed.

    >>> state = HookState()
    >>> state.iter, state.stats.iterations, state.buckets
    (0, 0, {})
    """

    nonfinite = "propagate"
    plain_parts = False

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"process_group must be a torch.distributed.ProcessGroup or None, got "
                f"{process_group!r}"
            )
        self.process_group = process_group
        self.iter = 0
        self.stats = SketchStats()
        self.buckets: dict[int, BucketState] = {}
        self.held: dict[tuple, BucketState] = {}
        self.positions: dict[int, int] | None = None
        self.first_step = True
        self.lock = threading.Lock()
        self.step = StepGuard(self.lock, self.discard_step)

    # ------------------------------------------------------------------ what subclasses define
    def new_bucket_state(self, key: tuple, numel: int, device: torch.device | None) -> BucketState:
        """A fresh [`BucketState`][sketchcomm.engine.BucketState] for a bucket of ``numel`` elements
        with layout ``key``."""
        raise NotImplementedError(f"{type(self).__name__} makes no bucket state")

    def agreement_fields(self, bucket: BucketState) -> dict[str, float]:
        """Numbers that must be equal on every rank for this bucket."""
        return {
            "bucket elements": bucket.sketch.dim,
            "columns": bucket.sketch.columns,
            "hash functions": float(bucket.sketch.fingerprint % (1 << 52)),
        }

    def discard_step(self) -> None:
        """Drop whatever raw per-step data the state holds (called on a failed step)."""

    def end_iteration(self) -> None:
        """Called after the last bucket of every step."""
        self.stats.end_iteration()
        self.iter += 1
        if not self.first_step:
            self.held = {}
        self.first_step = False

    # ------------------------------------------------------------------ binding
    def bind(self, module: nn.Module) -> None:
        """Key bucket state by ``module``'s parameters (see
        [`sketchcomm.buckets`][sketchcomm.buckets])."""
        self.positions = {id(p): i for i, p in enumerate(module.parameters())}
        self.first_step = True

    def register(self, ddp_model: nn.Module, hook: Callable) -> None:
        """Bind this state to ``ddp_model``'s parameters and register ``hook`` on it."""
        self.bind(getattr(ddp_model, "module", ddp_model))
        ddp_model.register_comm_hook(self, hook)

    # ------------------------------------------------------------------ the protocol
    def open(
        self, bucket: dist.GradBucket, *, with_state: bool = True, split: bool = False
    ) -> BucketContext:
        """Start the protocol for ``bucket``: read the layout and (with ``with_state``) find or
        make the bucket's state, checked across ranks when new. With ``split`` (for hooks that
        go through `BucketContext.parts()`) a bucket may come split into restored states."""
        if bucket.index() == 0:  # DDP launches buckets in index order: a new step
            self.step = StepGuard(self.lock, self.discard_step)
        # The context keeps the group as given (None for the default group), never the resolved
        # world group: its callbacks run on the backend's threads, and holding the last reference
        # to a destroyed group there would make the group join its own thread.
        group = self.process_group
        layout = BucketLayout.of(bucket, self.positions)
        bucket_state = None
        parts = split_bucket(self, bucket, layout) if with_state and split else None
        if parts is not None:
            layout = BucketLayout.joined(layout, [part for part, _ in parts])
        elif with_state:
            bucket_state = bucket_state_for(self, bucket, layout, group)
        self.step.buffers.append(bucket.buffer())
        self.step.parameters.extend(bucket.parameters())
        return BucketContext(self, bucket, group, layout, bucket_state, parts)


class BucketContext:
    """One bucket going through the protocol of a [`HookState`][sketchcomm.engine.HookState], made
    by [`HookState.open()`][sketchcomm.engine.HookState.open]: the ``bucket`` and its ``buffer``,
    ``layout`` and ``bucket_state`` (None when opened without), the process ``group`` (None for the
    default group) with this ``rank`` and ``world`` size.

    >>> from sketchcomm.sketch import CountSketch
    >>> BucketContext.sketch.__doc__
    "The bucket's Count Sketch."
    """

    def __init__(
        self,
        state: HookState,
        bucket: dist.GradBucket,
        group: dist.ProcessGroup | None,
        layout: BucketLayout,
        bucket_state: BucketState | None,
        parts: list[tuple[BucketLayout, BucketState | None]] | None = None,
    ) -> None:
        self.state, self.bucket, self.group, self.layout = state, bucket, group, layout
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.bucket_state, self.split = bucket_state, parts
        self.buffer = bucket.buffer()
        self.iteration = state.iter
        self.step = state.step
        self._packed: tuple[Tensor, Tensor] | None = None

    @property
    def sketch(self) -> CountSketch:
        """The bucket's Count Sketch."""
        if self.bucket_state is None:
            raise RuntimeError(
                "the bucket was opened without state"
                if self.split is None
                else "the bucket is split into restored states: go through context.parts()"
            )
        return self.bucket_state.sketch

    def parts(self) -> list[BucketContext]:
        """The bucket as the parts whose results, one after the other, make its canonical
        vector: itself, or the parts of a split bucket (see
        [`sketchcomm.bucket_states`][sketchcomm.bucket_states]), each with its own layout and
        state (None: send that part uncompressed)."""
        if self.split is None:
            return [self]
        return [
            BucketContext(self.state, self.bucket, self.group, layout, bucket_state)
            for layout, bucket_state in self.split
        ]

    def canonical(self) -> Tensor:
        """The bucket buffer ``[d]`` in canonical order (see
        [`BucketLayout`][sketchcomm.engine.BucketLayout])."""
        return self.layout.to_canonical(self.buffer)

    def build(
        self,
        shape: tuple[int, ...],
        make: Callable[[], Tensor],
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``make()``, the message of ``shape`` and ``dtype``, unless this rank's hook already
        failed in this step or ``make`` raises: then all zeros, and the failure is sent with the
        exchange (see the module docstring)."""
        if self.step.local_error is None:
            try:
                message = make()
                if tuple(message.shape) != tuple(shape) or message.dtype != dtype:
                    raise RuntimeError(
                        f"the hook made a {tuple(message.shape)} {message.dtype} message where "
                        f"{tuple(shape)} {dtype} was expected"
                    )
                return message
            except Exception as error:  # every rank must learn of it: see the module docstring
                self.step.local_error = error
        return torch.zeros(shape, dtype=dtype, device=self.buffer.device)

    def build_into(self, numel: int, write: Callable[[Tensor], None]) -> Tensor:
        """Like `build()`: the ``[numel]`` fp32 message, which ``write(message)`` fills in place,
        starting from zeros. The message is the head of the buffer the exchange sends (with the
        failure flags after it), so it is never copied; all zeros when this rank's hook already
        failed in this step or ``write`` raises."""
        packed = torch.zeros(numel + self.world, dtype=torch.float32, device=self.buffer.device)
        message = packed[:numel]
        if self.step.local_error is None:
            try:
                write(message)
            except Exception as error:  # every rank must learn of it: see the module docstring
                self.step.local_error = error
                packed.zero_()
        self._packed = (message, packed)
        return message

    def record(self, sent_elements: int, sent_bytes: int, *, compressed: bool = True) -> None:
        """Count what this rank sends for the bucket in
        [`SketchStats`][sketchcomm.engine.SketchStats]."""
        self.state.stats.record_bucket(sent_elements, sent_bytes, self.buffer, compressed)

    def nonfinite_result(self) -> Tensor:
        """The result of a bucket whose exchanged message is not finite: NaN (so that AMP's
        ``GradScaler`` skips the step), or ``FloatingPointError`` with ``nonfinite="raise"``."""
        with self.state.lock:
            self.state.stats.nonfinite_buckets += 1
        if self.state.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite gradient in bucket {self.bucket.index()} at iteration "
                f"{self.iteration} (NaN or Inf on at least one rank)"
            )
        return torch.full((self.layout.numel,), float("nan"), device=self.buffer.device)

    def _pack(self, message: Tensor) -> Tensor:
        if self._packed is not None and self._packed[0] is message:
            packed = self._packed[1]
            if self.step.local_error is not None:
                packed[message.numel() + self.rank] = error_code(self.step.local_error)
            return packed
        flags = torch.zeros(self.world, dtype=message.dtype, device=message.device)
        if self.step.local_error is not None:
            flags[self.rank] = error_code(self.step.local_error)
        return torch.cat((message.reshape(-1), flags))

    def _failed(self, flags: Tensor) -> bool:
        """True (and the first failing rank noted) when any rank flagged a failure."""
        if not bool((flags != 0).any()):
            return False
        if self.step.remote is None:
            rank = int(torch.nonzero(flags)[0, 0])
            self.step.remote = (rank, error_name(int(flags[rank].round())))
        return True

    def _checked(self, payload: Tensor, decode: Callable[[Tensor], Tensor]) -> Tensor:
        if not tensor_is_finite(payload):
            return self.nonfinite_result()
        return decode(payload)

    def allreduce_now(self, message: Tensor) -> Tensor | None:
        """Allreduce ``message`` (a first round) and wait: the sum shaped like ``message``, or
        None when some rank failed (then end the bucket with `without_exchange()`)."""
        packed = self._pack(message)
        dist.all_reduce(packed, group=self.group)
        if self._failed(packed[-self.world :]):
            packed.zero_()  # nothing is kept from a step that failed somewhere
            return None
        return packed[: message.numel()].view(message.shape)

    def allreduce(
        self, message: Tensor, decode: Callable[[Tensor], Tensor], *, check_finite: bool = True
    ) -> torch.futures.Future[Tensor]:
        """Sum ``message`` over the ranks asynchronously; ``decode(summed)``, with ``summed``
        shaped like ``message``, gives the bucket's result ``[d]`` in canonical order, or the
        bucket buffer itself holding the result in the bucket's order (with
        ``check_finite`` a non-finite sum never reaches ``decode``: see
        `nonfinite_result()`). Returns the future DDP waits for."""
        packed, shape = self._pack(message), message.shape

        def outcome() -> Tensor | None:
            if self._failed(packed[-self.world :]):
                packed.zero_()
                return None
            summed = packed[: -self.world].view(shape)
            return self._checked(summed, decode) if check_finite else decode(summed)

        work = dist.all_reduce(packed, group=self.group, async_op=True).get_future()
        return self._finish(work, outcome)

    def allgather(
        self, message: Tensor, decode: Callable[[list[Tensor]], Tensor]
    ) -> torch.futures.Future[Tensor]:
        """Gather every rank's ``message`` (synchronously); ``decode(messages)`` gives the
        bucket's result ``[d]`` in canonical order."""
        packed = self._pack(message)
        gathered = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(gathered, packed, group=self.group)

        def outcome() -> Tensor | None:
            if self._failed(torch.stack([g[-self.world :] for g in gathered]).sum(0)):
                return None
            return decode([g[: -self.world] for g in gathered])

        return self._finish(_completed(), outcome)

    def without_exchange(self, outcome: Callable[[], Tensor | None]) -> torch.futures.Future:
        """End the bucket with no further exchange: ``outcome()`` is its result, None when a
        first round saw a failure."""
        return self._finish(_completed(), outcome)

    def _finish(
        self, work: torch.futures.Future, outcome: Callable[[], Tensor | None]
    ) -> torch.futures.Future[Tensor]:
        state, step, bucket = self.state, self.step, self.bucket
        gate: torch.futures.Future = torch.futures.Future()
        result: list = [None]

        def arrived(exchanged: torch.futures.Future) -> None:
            try:
                exchanged.value()  # raises if the collective failed (e.g. a rank died)
                result[0] = outcome()
            except Exception as error:
                result[0] = error
            step.arrive(gate, result)

        last = bucket.is_last()
        if last:
            state.end_iteration()
        work.add_done_callback(arrived)
        if last:
            step.expect(bucket.index() + 1)
            if step.local_error is not None:
                work.wait()
                step.discard()
                raise step.local_error
        buffer, layout = self.buffer, self.layout

        def release(_: torch.futures.Future) -> Tensor:
            value = result[0]
            if isinstance(value, BaseException):
                raise value
            if value is buffer:  # the result was written over the bucket, in its own order
                return value
            return layout.from_canonical(value.to(buffer.dtype))

        return gate.then(release)


def _completed() -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(None)
    return future
