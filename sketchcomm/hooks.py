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
    state.register(ddp_model)        # or ddp_model.register_comm_hook(state, sketch_hook)

Recovery modes (``recovery``) and their traffic per bucket and step:

* ``"dense"``: the median-over-rows estimate of every coordinate; ``r * c`` fp32 values. With one
  row the estimate is unbiased, with more rows it is robust to heavy collisions.
* ``"topk"``: the ``k = ceil(topk_fraction * d)`` coordinates with the
  largest estimates and their estimates, zero elsewhere (Sketched SGD, Ivkin et al. 2019;
  FetchSGD, Rothchild et al. 2020); ``r * c`` fp32 values.
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
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sketchcomm.buckets import BucketState
from sketchcomm.config import SketchConfig
from sketchcomm.engine import HookState
from sketchcomm.optimizers import (
    OptimizerChoice,
    OptimizerWatch,
    apply_choice,
    choose,
    configured,
)
from sketchcomm.recovery import decode_into
from sketchcomm.second_round import message_size, part_message_into, second_round
from sketchcomm.sketch import CountSketch, derive_seed
from sketchcomm.stats import SketchStats
from sketchcomm.validation import check_int

__all__ = ["SketchConfig", "SketchState", "sketch_hook"]

logger = logging.getLogger(__name__)


class SketchState(HookState):
    r"""Configuration and per-bucket state of [`sketch_hook()`][sketchcomm.hooks.sketch_hook].

    Keyword arguments (the fields of [`SketchConfig`][sketchcomm.SketchConfig], or ``config=`` one):

    * ``compression``: bucket elements per table element, ``d / (r * c)``; must exceed 1. The
      columns are the largest prime ``c <= d / (compression * r)``.
    * ``rows``: hash rows ``r`` (default 3 for ``"topk"``, 1 for ``"dense"``).
    * ``columns``: explicit columns ``c`` for every bucket, overriding ``compression``. Buckets are
      then sketched even when the table is as large as the bucket (with ``c >= d`` the recovery is
      exact).
    * ``recovery``: ``"topk"`` or ``"dense"`` (see the module docstring).
    * ``topk_fraction``: ``k`` as a fraction of the bucket's elements, in ``(0, 1]`` (default
      0.01; 1 when not given and the optimizer has momentum or adapts: `sketchcomm.optimizers`).
    * ``second_round``: allreduce the exact values of ``candidates * k`` candidates and keep the
      ``k`` largest (``"topk"`` only, not with ``error_feedback="sketch"``).
    * ``candidates``: candidates per kept coordinate in the second round, at least 1.
    * ``error_feedback``: ``"local"``, ``"sketch"`` or ``"none"`` (default: ``"local"`` with a
      second round, ``"sketch"`` for other top-k, ``"none"`` for dense).
    * ``momentum``: momentum ``rho`` in ``[0, 1)`` kept in sketch space (``"sketch"`` only).
    * ``start_iter``: iterations of plain allreduce before sketching starts.
    * ``min_compression_size``: buckets with fewer elements are allreduced uncompressed.
    * ``seed``: hash seed; must be equal on every rank (checked).
    * ``nonfinite``: what to do when a summed table holds NaN or Inf (some rank's gradient was not
      finite): ``"propagate"`` returns a bucket filled with NaN, leaves the error-feedback state
      untouched and counts it in ``stats.nonfinite_buckets``, so that AMP's ``GradScaler`` skips
      the step; ``"raise"`` raises ``FloatingPointError`` on every rank.

    Runtime options: ``process_group`` (default: the world) and ``log_every`` (log the
    communication figures every this many iterations on rank 0; 0: never).

    >>> state = SketchState(compression=10, recovery="dense")
    >>> state.config.rows, state.config.table_shape_for(1_000_000)
    (1, (1, 99991))
    >>> SketchState(config=state.config).config == state.config
    True
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        config: SketchConfig | None = None,
        log_every: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(process_group)
        if config is not None and options:
            raise ValueError("give either config or sketch options, not both")
        #: The options as given: what checkpoints record and compare.
        self.requested = config if config is not None else SketchConfig(**options)
        #: The options the hook runs with: ``requested`` plus what `attach()` chose.
        self.config = self.requested
        #: Whether the user set ``topk_fraction`` (a whole ``config`` counts as set): the
        #: optimizer choice then keeps it.
        self.topk_given = config is not None or "topk_fraction" in options
        self.optimizer_choice: OptimizerChoice | None = None
        self.watch: OptimizerWatch | None = None
        self.told_unseen = False
        check_int("log_every", log_every, 0)
        self.log_every = log_every

    plain_parts = True

    @property
    def nonfinite(self) -> str:
        return self.config.nonfinite

    def register(self, ddp_model: nn.Module, hook: Callable | None = None) -> None:
        """Register ``hook`` (default [`sketch_hook()`][sketchcomm.hooks.sketch_hook]) on
        ``ddp_model`` and bind this state to the model's parameters, so that per-bucket state
        follows parameters rather than bucket
        order and survives bucket rebuilds and restarts (see
        [`sketchcomm.buckets`][sketchcomm.buckets]). With the default hook, the first optimizer
        that steps the model's parameters is passed to `attach()` unless it was attached already
        (see `sketchcomm.optimizers`)."""
        hook = sketch_hook if hook is None else hook
        super().register(ddp_model, hook)
        if self.watch is not None:
            self.watch.remove()
            self.watch = None
        if hook is sketch_hook:
            module = getattr(ddp_model, "module", ddp_model)
            self.watch = OptimizerWatch(module.parameters(), self.attach)

    # ------------------------------------------------------------------ the user's optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> OptimizerChoice:
        """Tell the hook the training's optimizer, before its first step. With FetchSGD recovery
        an SGD optimizer's momentum is moved into sketch space (the optimizer's is set to 0);
        other optimizers are left as they are (see
        `sketchcomm.optimizers`).
        The choice is logged and warned once, kept in checkpoints and re-applied to the
        optimizer of a resumed run; returns it."""
        if self.watch is not None:
            self.watch.remove()
            self.watch = None
        if self.optimizer_choice is not None:
            apply_choice(self.optimizer_choice, optimizer)
            return self.optimizer_choice
        choice = choose(self.requested, optimizer, topk_given=self.topk_given)
        apply_choice(choice, optimizer)
        self.use_choice(choice)
        logger.info("sketch_hook: %s", choice.message)
        warnings.warn(f"sketch_hook: {choice.message}", stacklevel=2)
        return choice

    def use_choice(self, choice: OptimizerChoice) -> None:
        """Run with ``choice``'s sketch-space momentum and least ``topk_fraction`` from now on
        (buckets already made keep their tables and take the new ``k``)."""
        self.optimizer_choice = choice
        self.config = configured(choice, self.requested)
        for bucket in self.buckets.values():
            bucket.topk, bucket.candidates = self.config.kept_coordinates(bucket.sketch.dim)

    def tell_unseen_optimizer(self) -> None:
        """Warn once when sketching starts and no optimizer was seen (FetchSGD recovery without
        sketch-space momentum: an optimizer's momentum, if any, trains worse)."""
        if self.told_unseen or self.optimizer_choice is not None:
            return
        self.told_unseen = True
        if self.config.error_feedback == "sketch" and not self.config.momentum:
            warnings.warn(
                "sketch_hook has not seen the optimizer: if it has momentum, call "
                "state.attach(optimizer) before training (it moves the momentum into sketch "
                "space), or use SketchState(momentum=RHO) with SGD(momentum=0)",
                stacklevel=2,
            )

    def describe(self) -> str:
        """One paragraph: the recovery, the table, and what was decided about the optimizer."""
        config = self.config
        topk = f"k = {config.topk_fraction:g} d"
        if config.second_round:
            recovery = f"top-k ({topk}) with a second round and local error feedback"
        elif config.recovery == "topk" and config.topk_fraction >= 1.0:
            recovery = "every coordinate (k = d): the median estimate, nothing accumulated"
        elif config.recovery == "topk":
            recovery = f"FetchSGD top-k ({topk}), error accumulated in the summed table"
        else:
            recovery = "dense median estimate"
        seen = (
            self.optimizer_choice.message
            if self.optimizer_choice is not None
            else "optimizer not seen yet (attach() or the first step tells it)"
        )
        return (
            f"compression {config.compression:g}x, {config.rows} rows, {recovery}, "
            f"sketch-space momentum {config.momentum:g}, plain allreduce for the first "
            f"{config.start_iter} iterations; {seen}"
        )

    # ------------------------------------------------------------------ per-bucket state
    def new_bucket_state(self, key: tuple, numel: int, device: torch.device | None) -> BucketState:
        shape = self.config.table_shape_for(numel)
        if shape is None:
            raise ValueError(
                f"a bucket of {numel} elements is not sketched with this configuration"
            )
        sketch = CountSketch(numel, *shape, derive_seed(self.config.seed, key), device)
        return BucketState(key, sketch, *self.config.kept_coordinates(numel))

    def agreement_fields(self, bucket: BucketState) -> dict[str, float]:
        return {
            **super().agreement_fields(bucket),
            **self.config.agreement_fields(),
            "topk": bucket.topk,
            "candidates": bucket.candidates,
        }

    def end_iteration(self) -> None:
        super().end_iteration()
        if self.log_every and self.iter % self.log_every == 0 and _rank(self.process_group) == 0:
            s = self.stats
            logger.info(
                "iteration %d: sent %d bytes (%d uncompressed), ratio %.1fx",
                self.iter,
                s.step_bytes_sent,
                s.step_bytes_uncompressed,
                s.compression_ratio,
            )

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_config(self) -> dict[str, Any]:
        """What a checkpoint records and must match on load: the options as given."""
        return self.requested.as_dict()

    def migrate_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved configuration in today's terms (older checkpoints lack newer fields, which
        then take their defaults)."""
        return {**SketchConfig().as_dict(), "rows": self.requested.rows, **saved}

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
        choice = self.optimizer_choice
        return {
            "config": self.checkpoint_config(),
            "iter": self.iter,
            "stats": self.stats.as_record(),
            "buckets": buckets,
            "optimizer": None if choice is None else choice.as_record(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()`; its configuration must equal this state's."""
        saved, now = self.migrate_config(state_dict["config"]), self.checkpoint_config()
        differing = sorted(k for k in now if saved.get(k) != now[k])
        if differing:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in differing)
            raise ValueError(
                f"checkpoint was made with another sketch configuration ({details}): build the "
                "state with the checkpoint's options to resume it"
            )
        self.iter = int(state_dict["iter"])
        choice = state_dict.get("optimizer")
        if choice is not None:
            self.use_choice(OptimizerChoice(**choice))
        self.stats = SketchStats(**state_dict["stats"])
        self.buckets = {}
        for index, saved_bucket in state_dict["buckets"].items():
            state = self.new_bucket_state(
                tuple(saved_bucket["layout"]), saved_bucket["numel"], None
            )
            state.residual = saved_bucket["residual"]
            state.error_table = saved_bucket["error_table"]
            state.momentum_table = saved_bucket["momentum_table"]
            self.buckets[int(index)] = state

    def __getstate__(self) -> dict[str, Any]:
        # Process groups and locks cannot be pickled: what is kept is the checkpoint.
        return {
            "config": self.requested,
            "log_every": self.log_every,
            "checkpoint": self.state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        SketchState.__init__(self, config=state["config"], log_every=state["log_every"])
        self.load_state_dict(state["checkpoint"])


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _plain_allreduce(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """The averaging allreduce DDP would do, through the engine (so that a failure elsewhere is
    still seen)."""
    context = state.open(bucket, with_state=False)
    buffer = context.buffer
    message = context.build(
        (buffer.numel(),), lambda: context.canonical() / context.world, dtype=buffer.dtype
    )
    context.record(buffer.numel(), buffer.numel() * buffer.element_size(), compressed=False)
    return context.allreduce(message, lambda summed: summed, check_finite=False)


def sketch_hook(state: SketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: allreduce Count Sketch tables instead of gradients.

    Every rank sketches its bucket (plus its residual under local error feedback) into an
    ``[r, c]`` fp32 table, the tables are summed with one allreduce, and every rank recovers the
    same estimate of the summed gradient (see [`SketchState`][sketchcomm.hooks.SketchState] for the
    recovery modes). The returned future holds ``bucket.buffer()`` itself, the result averaged over
    the world size written over it (read and written in the bucket's own order through the
    layout's [`Placement`][sketchcomm.placement.Placement]: no ``d``-element copy into canonical
    order and back). A bucket split into the parts of a restored checkpoint (see
    [`sketchcomm.bucket_states`][sketchcomm.bucket_states]) sends the parts' tables one after the
    other in the same allreduce.

    All collectives are issued from the hook itself, never from a future's callback, so that
    every rank issues them in the same order. With ``second_round=True`` the hook therefore waits
    for the table allreduce before it starts the second one.
    """
    config = state.config
    numel = bucket.buffer().numel()
    if state.iter < config.start_iter or config.table_shape_for(numel) is None:
        return _plain_allreduce(state, bucket)
    state.tell_unseen_optimizer()
    context = state.open(bucket, split=True)
    if config.second_round:
        return second_round(state, context)
    parts, decoding, buffer = context.parts(), config.decoding, context.buffer
    sizes = [message_size(part) for part in parts]

    def write(message: Tensor) -> None:
        for part, piece in zip(parts, message.split(sizes), strict=True):
            part_message_into(part, piece)

    table = context.build_into(sum(sizes), write)
    context.record(table.numel(), table.numel() * 4)

    def finish(summed: Tensor) -> Tensor:
        # Written over the bucket, in its own order (through fp32 for a half-precision bucket).
        target = (
            buffer
            if buffer.dtype == torch.float32
            else torch.empty_like(buffer, dtype=torch.float32)
        )
        for part, piece in zip(parts, summed.split(sizes), strict=True):
            placement = part.layout.placement
            if part.bucket_state is None:
                placement.scatter(piece, target)
            else:
                table_n = piece.view(part.sketch.table_shape)
                decode_into(decoding, part.bucket_state, table_n, target, placement, context.world)
        return buffer if target is buffer else buffer.copy_(target)

    return context.allreduce(table, finish)
