"""Canonical layout of a DDP gradient bucket.

DDP fills a bucket's flat buffer with its parameters' gradients in the bucket's own order, and
that order changes when DDP rebuilds its buckets after the first iteration (and again in the first
iteration of a DDP model rebuilt from a checkpoint). A sketch table or residual kept for a bucket
is only meaningful in one flat order, so the hooks work in a *canonical* order: the bucket's
parameters by descending position in the model (the order in which gradients usually become
ready, so the rebuilt buckets need no copy). The positions are known once the state is bound to
the model (``state.register(ddp_model)``); an unbound state falls back to the bucket's own order
and keys its state by the bucket's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor

from sketchcomm.placement import Placement
from sketchcomm.sketch import CountSketch


@dataclass(frozen=True)
class BucketLayout:
    """``key`` identifies the bucket's parameters (independently of their order); ``order`` lists
    the indices into ``bucket.parameters()`` in canonical order; ``slices`` are the
    ``(offset, length)`` of each parameter in the bucket buffer, in canonical order, or None when
    the buffer already is in canonical order.

    >>> layout = BucketLayout(("params", (1, 0)), 5, (1, 0), ((3, 2), (0, 3)))
    >>> flat = torch.arange(5.0)  # parameter 0 holds [0, 1, 2], parameter 1 holds [3, 4]
    >>> canonical = layout.to_canonical(flat)
    >>> canonical.tolist(), layout.from_canonical(canonical).tolist()
    ([3.0, 4.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    """

    key: tuple
    numel: int
    order: tuple[int, ...]
    slices: tuple[tuple[int, int], ...] | None

    @classmethod
    def of(
        cls,
        bucket: dist.GradBucket,
        positions: dict[int, int] | None,
        only: frozenset[int] | None = None,
    ) -> BucketLayout:
        """The layout of ``bucket``, or with ``only`` (positions in the model) of the part of the
        bucket that holds those parameters (its slices then always index the whole buffer)."""
        params = bucket.parameters()
        numel = bucket.buffer().numel()
        if positions is None:
            key = ("shapes", numel, tuple(tuple(p.shape) for p in params))
            return cls(key, numel, tuple(range(len(params))), None)
        try:
            ranks = [positions[id(p)] for p in params]
        except KeyError as error:
            raise ValueError(
                "a bucket holds a parameter of another model: the state was registered on a "
                "different DDP model"
            ) from error
        chosen = [i for i, r in enumerate(ranks) if only is None or r in only]
        order = sorted(chosen, key=lambda i: -ranks[i])
        key = ("params", tuple(ranks[i] for i in order))
        if only is None and order == list(range(len(params))):
            return cls(key, numel, tuple(order), None)
        offsets, offset = [], 0
        for p in params:
            offsets.append(offset)
            offset += p.numel()
        slices = tuple((offsets[i], params[i].numel()) for i in order)
        return cls(key, sum(n for _, n in slices), tuple(order), slices)

    @classmethod
    def joined(cls, whole: BucketLayout, parts: list[BucketLayout]) -> BucketLayout:
        """The layout of ``whole`` whose canonical order is the parts' canonical orders one after
        the other (each part from `of()` with ``only``)."""
        order = tuple(i for part in parts for i in part.order)
        slices = tuple(s for part in parts for s in part.slices or ())
        return cls(whole.key, whole.numel, order, slices)

    @cached_property
    def placement(self) -> Placement:
        """Where the canonical vector's coordinates lie in the bucket buffer (see
        [`Placement`][sketchcomm.placement.Placement])."""
        return Placement(self.slices, self.numel)

    def to_canonical(self, flat: Tensor) -> Tensor:
        """The bucket buffer ``[numel]`` in canonical order (the same tensor if already so)."""
        return flat if self.slices is None else self.placement.gather(flat)

    def from_canonical(self, flat: Tensor) -> Tensor:
        """Inverse of `to_canonical()`."""
        return flat if self.slices is None else self.placement.scatter(flat, torch.empty_like(flat))


@dataclass
class BucketState:
    """What a hook keeps for one gradient bucket between steps.

    ``layout`` is the `BucketLayout.key` of the parameters it was made for, ``sketch`` the
    bucket's Count Sketch, ``topk`` the coordinates kept by top-k recovery, ``candidates`` the
    coordinates whose exact values a second round sends. ``residual`` (``[d]``, local error
    feedback), ``error_table`` and ``momentum_table`` (``[r, c]``, sketch-space error feedback)
    are None until first used; so is ``output`` (``[d]`` fp32), the result vector that
    [`output_buffer()`][sketchcomm.recovery.output_buffer] reuses from step to step (never saved).

    >>> from sketchcomm.sketch import CountSketch
    >>> state = BucketState(("shapes",), CountSketch(100, 1, 11), topk=5, candidates=10)
    >>> state.sketch.table_shape, state.error_table is None
    ((1, 11), True)
    """

    layout: tuple
    sketch: CountSketch
    topk: int
    candidates: int
    residual: Tensor | None = None
    error_table: Tensor | None = None
    momentum_table: Tensor | None = None
    output: Tensor | None = None

    def to(self, device: torch.device) -> None:
        """Move the hash parameters and error-feedback tensors to ``device`` in place."""
        old = self.sketch
        self.sketch = CountSketch(old.dim, old.rows, old.columns, old.seed, device)
        for name in ("residual", "error_table", "momentum_table"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
