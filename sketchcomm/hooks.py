r"""Count Sketch gradient communication for DistributedDataParallel.

Instead of allreducing a gradient bucket ``g_w`` of ``d`` elements on each of ``W`` ranks, every
rank sketches its bucket into an ``r x c`` table ``S(g_w)`` (``r * c ~ d / compression``),
the tables are allreduced, and every rank recovers the same estimate of the sum from the summed
table, because a Count Sketch is linear:

.. math::

    \sum_w S(g_w) = S\Big(\sum_w g_w\Big).

The hook returns that estimate divided by ``W``, so it is a drop-in replacement for DDP's
averaging allreduce::

    state = SketchState(compression=20)
    ddp_model.register_comm_hook(state, sketch_hook)

Recovery modes (``recovery``) and their traffic per bucket and step:

* ``"dense"``: the median-over-rows estimate of every coordinate; ``r * c`` fp32 values. With one
  row the estimate is unbiased, with more rows it is robust to heavy collisions.
* ``"topk"``: the ``k = ceil(topk_fraction * d)`` coordinates with the largest estimates and their
  estimates, zero elsewhere (Sketched SGD, Ivkin et al. 2019; FetchSGD, Rothchild et al. 2020);
  ``r * c`` fp32 values.
* ``"topk"`` with ``second_round=True``: ``m = ceil(candidates * k)`` candidates with the largest
  estimates are chosen from the summed table, their exact values are allreduced in a second round
  and the ``k`` largest exact values are kept (Sketched SGD); ``r * c + m`` values.

Error feedback (``error_feedback``), which is what lets high compression ratios train:

* ``"local"`` (second round only): each rank keeps what it did not get to send, the coordinates
  of ``g_w + e_w`` outside the ``k`` selected ones, ``e_w <- (g_w + e_w) * (1 - m)``, and adds it
  to its next gradient; the second round makes the applied values exact, so this is exact error
  feedback. Without a second round it diverges: the applied values are sketch estimates whose
  noise grows with the residual, and feeding back ``(g_w + e_w) - \hat g`` as PowerSGD does is
  worse still, since on real gradients that noise exceeds the mass the top-k captures.
* ``"sketch"`` (top-k only): momentum and error are accumulated in sketch space on the
  *aggregated* table, as in FetchSGD: ``S_u <- rho S_u + S``, ``S_e <- S_e + S_u``,
  ``\Delta = Top_k(U(S_e))``, then the cells of ``S_e`` and ``S_u`` that the selected coordinates
  hash to are zeroed (subtracting ``S(\Delta)`` instead is unstable, since every coordinate of a
  heavy cell shares its estimate). The state is identical on every rank and holds no rank's
  private residual, which is what a private hook needs. Use it with plain SGD: the momentum lives
  in the sketch.
* ``"none"``: the only choice for ``"dense"``, whose estimate is not a contraction (a one-row
  estimate has variance ``||g||^2 / c`` per coordinate), so any error feedback would diverge.

Like PowerSGD, the hook runs a plain allreduce for the first ``start_iter`` iterations (DDP
rebuilds its buckets after the first one) and for buckets too small for compression to pay.
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sketchcomm.buckets import BucketLayout
from sketchcomm.recovery import BucketState, decode_table
from sketchcomm.sketch import CountSketch, derive_seed, prime_at_most
from sketchcomm.stats import SketchStats
from sketchcomm.validation import check_choice, check_float, check_int

__all__ = ["SketchState", "SketchStats", "sketch_hook"]

logger = logging.getLogger(__name__)

_RECOVERY = ("topk", "dense")
_ERROR_FEEDBACK = ("local", "sketch", "none")
_NONFINITE = ("propagate", "raise")
_DEFAULT_ROWS = {"topk": 3, "dense": 1}


class SketchState:
    r"""Configuration and per-bucket state of :func:`sketch_hook`.

    Args:
        process_group: the group to communicate over (default: the world).
        compression: bucket elements per table element, ``d / (r * c)``; must exceed 1. The
            columns are the largest prime ``c <= d / (compression * r)``.
        rows: hash rows ``r`` (default 3 for ``"topk"``, 1 for ``"dense"``).
        columns: explicit columns ``c`` for every bucket, overriding ``compression``. Buckets are
            then sketched even when the table is as large as the bucket (with ``c >= d`` the
            recovery is exact).
        recovery: ``"topk"`` or ``"dense"`` (see the module docstring).
        topk_fraction: ``k`` as a fraction of the bucket's elements, in ``(0, 1]``.
        second_round: allreduce the exact values of ``candidates * k`` candidates and keep the
            ``k`` largest (``"topk"`` only, not with ``error_feedback="sketch"``).
        candidates: candidates per kept coordinate in the second round, at least 1.
        error_feedback: ``"local"``, ``"sketch"`` or ``"none"`` (default: ``"local"`` with a
            second round, ``"sketch"`` for other top-k, ``"none"`` for dense).
        momentum: momentum ``rho`` in ``[0, 1)`` kept in sketch space (``"sketch"`` only).
        start_iter: iterations of plain allreduce before sketching starts.
        min_compression_size: buckets with fewer elements are allreduced uncompressed.
        seed: hash seed; must be equal on every rank (checked).
        log_every: log the communication figures every this many iterations on rank 0 (0: never).
        nonfinite: what to do when a summed table holds NaN or Inf (some rank's gradient was not
            finite): ``"propagate"`` returns a bucket filled with NaN, leaves the error-feedback
            state untouched and counts it in ``stats.nonfinite_buckets``, so that AMP's
            ``GradScaler`` skips the step; ``"raise"`` raises ``FloatingPointError`` on every rank.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        compression: float = 20.0,
        rows: int | None = None,
        columns: int | None = None,
        recovery: str = "topk",
        topk_fraction: float = 0.01,
        second_round: bool = False,
        candidates: float = 2.0,
        error_feedback: str | None = None,
        momentum: float = 0.0,
        start_iter: int = 2,
        min_compression_size: int = 16384,
        seed: int = 0,
        log_every: int = 0,
        nonfinite: str = "propagate",
    ) -> None:
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise ValueError(
                f"process_group must be a torch.distributed.ProcessGroup or None, got "
                f"{process_group!r}"
            )
        check_float("compression", compression, 1.0, math.inf, open_low=True)
        check_choice("recovery", recovery, _RECOVERY)
        rows = _DEFAULT_ROWS[recovery] if rows is None else rows
        check_int("rows", rows, 1)
        if columns is not None:
            check_int("columns", columns, 1)
        check_float("topk_fraction", topk_fraction, 0.0, 1.0, open_low=True)
        if not isinstance(second_round, bool):
            raise ValueError(f"second_round must be a bool, got {second_round!r}")
        check_float("candidates", candidates, 1.0, math.inf, open_low=False)
        if error_feedback is None:
            error_feedback = (
                "none" if recovery == "dense" else "local" if second_round else "sketch"
            )
        check_choice("error_feedback", error_feedback, _ERROR_FEEDBACK)
        if recovery == "dense" and error_feedback != "none":
            raise ValueError(
                "error_feedback must be 'none' with recovery='dense' (it would diverge)"
            )
        if error_feedback == "local" and not second_round:
            raise ValueError("error_feedback='local' needs second_round=True (it would diverge)")
        check_float("momentum", momentum, 0.0, 1.0, open_low=False)
        if momentum == 1.0:
            raise ValueError("momentum must be below 1")
        if momentum and error_feedback != "sketch":
            raise ValueError("momentum is kept in sketch space: it needs error_feedback='sketch'")
        if second_round and recovery != "topk":
            raise ValueError("second_round needs recovery='topk'")
        if second_round and error_feedback == "sketch":
            raise ValueError(
                "second_round is incompatible with error_feedback='sketch': exact values of the "
                "current gradients do not match the accumulated sketch"
            )
        check_int("start_iter", start_iter, 0)
        check_int("min_compression_size", min_compression_size, 1)
        check_int("seed", seed, 0)
        check_int("log_every", log_every, 0)
        check_choice("nonfinite", nonfinite, _NONFINITE)

        self.process_group = process_group
        self.compression = float(compression)
        self.rows = rows
        self.columns = columns
        self.recovery = recovery
        self.topk_fraction = float(topk_fraction)
        self.second_round = second_round
        self.candidates = float(candidates)
        self.error_feedback = error_feedback
        self.momentum = float(momentum)
        self.start_iter = start_iter
        self.min_compression_size = min_compression_size
        self.seed = seed
        self.log_every = log_every
        self.nonfinite = nonfinite

        self.iter = 0
        self.stats = SketchStats()
        self.buckets: dict[int, BucketState] = {}
        self._positions: dict[int, int] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ configuration
    _CONFIG_KEYS = (
        "compression", "rows", "columns", "recovery", "topk_fraction", "second_round",
        "candidates", "error_feedback", "momentum", "start_iter", "min_compression_size", "seed",
        "nonfinite",
    )  # fmt: skip

    def config(self) -> dict[str, Any]:
        """The configuration as a plain dict (what must agree across ranks and checkpoints)."""
        return {key: getattr(self, key) for key in self._CONFIG_KEYS}

    def table_columns(self, numel: int) -> int | None:
        """Columns for a bucket of ``numel`` elements, or None if it is sent uncompressed."""
        if self.columns is not None:
            return self.columns
        if numel < self.min_compression_size:
            return None
        target = int(numel / (self.compression * self.rows))
        # Chunks must not outnumber columns (see sketchcomm.sketch): c >= sqrt(d).
        if target < 2 or target * target < numel:
            return None
        return prime_at_most(target)

    # ------------------------------------------------------------------ per-bucket state
    def register(self, ddp_model: torch.nn.Module, hook: Callable | None = None) -> None:
        """Register ``hook`` (default :func:`sketch_hook`) on ``ddp_model`` and bind this state to
        the model's parameters, so that per-bucket state follows parameters rather than bucket
        order and survives bucket rebuilds and restarts (see :mod:`sketchcomm.buckets`)."""
        module = getattr(ddp_model, "module", ddp_model)
        self._positions = {id(p): i for i, p in enumerate(module.parameters())}
        ddp_model.register_comm_hook(self, sketch_hook if hook is None else hook)

    def _bucket_state(
        self, bucket: dist.GradBucket, layout: BucketLayout, group: dist.ProcessGroup
    ) -> BucketState:
        device = bucket.buffer().device
        index = bucket.index()
        state = self.buckets.get(index)
        if state is not None and state.layout == layout.key:
            if state.sketch.device != device:
                self._move(state, device)
            return state
        if state is not None:
            # DDP rebuilt its buckets with other members, or a checkpoint came from another layout.
            self.stats.state_resets += 1
            if self.iter > 1:  # DDP's own rebuild after iteration 0 is expected
                logger.warning(
                    "bucket %d changed layout at iteration %d: state reset", index, self.iter
                )
        state = self._new_bucket_state(layout.key, layout.numel, device)
        self._check_agreement(index, state, group)
        self.buckets[index] = state
        return state

    def table_shape(self, numel: int) -> tuple[int, int] | None:
        """Rows and columns of a bucket's table, or None if the bucket is sent uncompressed."""
        columns = self.table_columns(numel)
        return None if columns is None else (self.rows, columns)

    def _new_bucket_state(self, key: tuple, numel: int, device: torch.device | None) -> BucketState:
        shape = self.table_shape(numel)
        if shape is None:
            raise ValueError(
                f"a bucket of {numel} elements is not sketched with this configuration"
            )
        sketch = CountSketch(numel, *shape, derive_seed(self.seed, key), device)
        return BucketState(key, sketch, *self._top_counts(numel))

    def _top_counts(self, numel: int) -> tuple[int, int]:
        """``k`` kept coordinates and ``m`` second-round candidates for a bucket."""
        k = max(1, math.ceil(self.topk_fraction * numel))
        return k, min(numel, math.ceil(self.candidates * k))

    @staticmethod
    def _move(state: BucketState, device: torch.device) -> None:
        old = state.sketch
        state.sketch = CountSketch(old.dim, old.rows, old.columns, old.seed, device)
        for name in ("residual", "error_table", "momentum_table"):
            value = getattr(state, name)
            if value is not None:
                setattr(state, name, value.to(device))

    def _agreement_fields(self, index: int, state: BucketState) -> dict[str, float]:
        codes = {"topk": 0, "dense": 1, "local": 0, "sketch": 1, "none": 2}
        return {
            "bucket elements": state.sketch.dim,
            "rows": self.rows,
            "columns": state.sketch.columns,
            "seed": self.seed,
            "recovery": codes[self.recovery],
            "k": state.k,
            "candidates": state.m,
            "second_round": float(self.second_round),
            "error_feedback": codes[self.error_feedback],
            "momentum": self.momentum,
            "hash functions": float(state.sketch.fingerprint % (1 << 52)),
        }

    def _check_agreement(self, index: int, state: BucketState, group: dist.ProcessGroup) -> None:
        """One allreduce of a small fingerprint: every rank learns the min and max of each field,
        so every rank raises the same error when they disagree (no rank is left hanging)."""
        fields = self._agreement_fields(index, state)
        local = torch.tensor(list(fields.values()), dtype=torch.float64)
        both = torch.cat((local, -local)).to(state.sketch.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        high, low = both[: len(fields)].cpu(), -both[len(fields) :].cpu()
        differing = [
            f"{name} ranges from {lo:g} to {hi:g}"
            for name, lo, hi in zip(fields, low.tolist(), high.tolist(), strict=True)
            if lo != hi
        ]
        if differing:
            raise ValueError(
                f"sketch configuration differs across ranks for bucket {index}: "
                + "; ".join(differing)
                + ". Every rank must build SketchState with the same arguments and seed."
            )

    # ------------------------------------------------------------------ bookkeeping
    def end_iteration(self) -> None:
        self.stats.end_iteration()
        self.iter += 1
        if self.log_every and self.iter % self.log_every == 0 and _rank(self.process_group) == 0:
            s = self.stats
            logger.info(
                "iteration %d: sent %d bytes (%d uncompressed), ratio %.1fx",
                self.iter, s.step_bytes_sent, s.step_bytes_uncompressed, s.compression_ratio,
            )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Configuration, iteration, statistics and every bucket's error-feedback tensors."""
        buckets = {
            index: {
                "layout": s.layout,
                "numel": s.sketch.dim,
                "residual": s.residual,
                "error_table": s.error_table,
                "momentum_table": s.momentum_table,
            }
            for index, s in self.buckets.items()
        }
        stats = {k: v for k, v in vars(self.stats).items() if not k.startswith("_")}
        return {"config": self.config(), "iter": self.iter, "stats": stats, "buckets": buckets}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; its configuration must equal this state's."""
        saved = state_dict["config"]
        differing = sorted(k for k in self._CONFIG_KEYS if saved.get(k) != getattr(self, k))
        if differing:
            details = ", ".join(
                f"{k}: saved {saved.get(k)!r}, now {getattr(self, k)!r}" for k in differing
            )
            raise ValueError(f"checkpoint was made with another sketch configuration ({details})")
        self.iter = int(state_dict["iter"])
        self.stats = SketchStats(**state_dict["stats"])
        self.buckets = {}
        for index, saved in state_dict["buckets"].items():
            state = self._new_bucket_state(tuple(saved["layout"]), saved["numel"], None)
            state.residual = saved["residual"]
            state.error_table = saved["error_table"]
            state.momentum_table = saved["momentum_table"]
            self.buckets[int(index)] = state

    def __getstate__(self) -> dict[str, Any]:
        # Process groups cannot be pickled; an unpickled state uses the default group.
        skip = ("process_group", "_lock", "_positions")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._positions = None
        self._lock = threading.Lock()


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _allreduce_average(
    tensor: Tensor, group: dist.ProcessGroup, world: int
) -> torch.futures.Future:
    tensor.div_(world)
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _nan_result(state: SketchState, bucket_index: int, buffer: Tensor) -> Tensor:
    with state._lock:
        state.stats.nonfinite_buckets += 1
    if state.nonfinite == "raise":
        raise FloatingPointError(
            f"non-finite gradient in bucket {bucket_index} at iteration {state.iter} "
            "(NaN or Inf on at least one rank)"
        )
    return torch.full_like(buffer, float("nan"))


def sketch_hook(state: SketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: allreduce Count Sketch tables instead of gradients.

    Every rank sketches its bucket (plus its residual under local error feedback) into an
    ``[r, c]`` fp32 table, the tables are summed with one allreduce, and every rank recovers the
    same estimate of the summed gradient (see :class:`SketchState` for the recovery modes). The
    returned future holds one tensor shaped and typed like ``bucket.buffer()``, averaged over the
    world size.

    All collectives are issued from the hook itself, never from a future's callback, so that
    every rank issues them in the same order. With ``second_round=True`` the hook therefore waits
    for the table allreduce before it starts the second one.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    numel = buffer.numel()
    full_bytes = numel * buffer.element_size()
    compress = state.iter >= state.start_iter and state.table_shape(numel) is not None
    if not compress:
        state.stats.record(numel, full_bytes, numel, full_bytes)
        state.stats.bypassed_buckets += 1
        if bucket.is_last():
            state.end_iteration()
        return _allreduce_average(buffer, group, world)

    layout = BucketLayout.of(bucket, state._positions)
    bs = state._bucket_state(bucket, layout, group)
    local = layout.to_canonical(buffer).float()
    if state.error_feedback == "local" and bs.residual is not None:
        local = local + bs.residual
    table = bs.sketch.sketch(local)
    sent = table.numel() + (bs.m if state.second_round else 0)
    state.stats.record(sent, sent * 4, numel, full_bytes)
    state.stats.compressed_buckets += 1
    index = bucket.index()
    if bucket.is_last():
        state.end_iteration()

    if state.second_round:
        dist.all_reduce(table, group=group)
        if not torch.isfinite(table).all():
            return _completed(_nan_result(state, index, buffer))
        candidates = bs.sketch.heavy_hitters(table, bs.m)[0]
        exact = local[candidates]
        fut = dist.all_reduce(exact, group=group, async_op=True).get_future()

        def finish_second_round(f: torch.futures.Future) -> Tensor:
            summed = f.value()[0]
            if not torch.isfinite(summed).all():
                return _nan_result(state, index, buffer)
            keep = summed.abs().topk(bs.k, sorted=False).indices
            indices, summed = candidates[keep], summed[keep]
            if state.error_feedback == "local":
                residual = local.clone() if local is buffer else local
                residual[indices] = 0.0
                bs.residual = residual
            result = torch.zeros(numel, dtype=buffer.dtype, device=buffer.device)
            result[indices] = (summed / world).to(buffer.dtype)
            return layout.from_canonical(result)

        return fut.then(finish_second_round)

    def decode(f: torch.futures.Future) -> Tensor:
        summed = f.value()[0]
        if not torch.isfinite(summed).all():
            return _nan_result(state, index, buffer)
        update = decode_table(state, bs, summed)
        return layout.from_canonical(update.div_(world).to(buffer.dtype))

    fut = dist.all_reduce(table, group=group, async_op=True).get_future()
    return fut.then(decode)


def _completed(value: Tensor) -> torch.futures.Future[Tensor]:
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(value)
    return fut
