"""Which saved state a gradient bucket continues from, whatever index DDP gives it.

A bucket's state is made for one set of parameters (its layout key, see
[`BucketLayout`][sketchcomm.buckets.BucketLayout]), while DDP numbers buckets by launch order and
changes their members: a freshly built DDP model sends its first backward in one bucket holding
every parameter and rebuilds its buckets after it. So a state restored from a checkpoint, or
displaced by a rebuild, is found by its parameters:

1. the state at the bucket's index, if it was made for the bucket's parameters;
2. else a state made for them at another index, or one held since a rebuild displaced it;
3. else, in the first step on a newly bound model and for hooks that open buckets with
   ``split=True``, the bucket *split* into the parameter sets of the states it holds (DDP's
   first bucket after a restart holds the checkpoint's buckets), plus one part without state for
   the parameters of buckets that were sent uncompressed (only for hooks whose ``plain_parts``
   is true). Every part then continues its own state, so the step computes what the
   uninterrupted run computed;
4. else a new state.

>>> from sketchcomm.sketch import CountSketch
>>> states = {0: BucketState(("params", (3, 2)), CountSketch(8, 1, 5), 1, 1),
...           1: BucketState(("params", (1,)), CountSketch(4, 1, 5), 1, 1)}
>>> parts = split_parts(states, ("params", (3, 2, 1, 0)), plain=True)
>>> {tuple(sorted(own)): state is not None for own, state in parts}  # False: sent uncompressed
{(2, 3): True, (1,): True, (0,): False}
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sketchcomm.buckets import BucketLayout, BucketState

if TYPE_CHECKING:
    from sketchcomm.engine import HookState

__all__ = ["bucket_state_for", "check_agreement", "made_for", "split_bucket", "split_parts"]

logger = logging.getLogger(__name__)


def _positions(key: tuple) -> frozenset[int] | None:
    return frozenset(key[1]) if key and key[0] == "params" else None


def made_for(
    buckets: dict[int, BucketState], held: dict[tuple, BucketState], key: tuple
) -> BucketState | None:
    """The state made for the parameters of layout ``key`` at any index, or held; else None."""
    for state in (*buckets.values(), *held.values()):
        if state.layout == key:
            return state
    return None


def split_parts(
    buckets: dict[int, BucketState], key: tuple, plain: bool
) -> list[tuple[frozenset[int], BucketState | None]] | None:
    """The parameters of layout ``key`` as the disjoint parameter sets of ``buckets``' states (in
    index order), and with ``plain`` a last part without state for the parameters none of them
    holds; None when no state lies inside ``key``, when two overlap, or when parameters are left
    over without ``plain``."""
    wanted = _positions(key)
    if wanted is None:
        return None
    parts: list[tuple[frozenset[int], BucketState | None]] = []
    covered: set[int] = set()
    for index in sorted(buckets):
        state = buckets[index]
        own = _positions(state.layout)
        if own is None or not own <= wanted or any(state is s for _, s in parts):
            continue
        if own & covered:
            return None
        parts.append((own, state))
        covered |= own
    rest = wanted - covered
    if not parts or (rest and not plain):
        return None
    return [*parts, (frozenset(rest), None)] if rest else parts


def check_agreement(
    index: int, fields: dict[str, float], device: torch.device, group: dist.ProcessGroup | None
) -> None:
    """One MAX allreduce of a small fingerprint of bucket ``index``'s new state: every rank
    learns the min and max of each field, so every rank raises the same error when they disagree
    (no rank is left hanging)."""
    local = torch.tensor(list(fields.values()), dtype=torch.float64)
    both = torch.cat((local, -local)).to(device)
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
            + ". Every rank must build its state with the same arguments and seed."
        )


def split_bucket(
    state: HookState, bucket: dist.GradBucket, layout: BucketLayout
) -> list[tuple[BucketLayout, BucketState | None]] | None:
    """The parts of ``bucket`` (of ``layout``) to split into, each continuing its state of
    ``state``, or None (step 3 above)."""
    split = state.first_step and split_parts(state.buckets, layout.key, state.plain_parts)
    if not split or made_for(state.buckets, state.held, layout.key) is not None:
        return None
    device = bucket.buffer().device
    for _, part_state in split:
        if part_state is not None and part_state.sketch.device != device:
            part_state.to(device)
    return [(BucketLayout.of(bucket, state.positions, own), s) for own, s in split]


def bucket_state_for(
    state: HookState,
    bucket: dist.GradBucket,
    layout: BucketLayout,
    group: dist.ProcessGroup | None,
) -> BucketState:
    """The state of ``state`` that ``bucket`` (of ``layout``) continues, found or made (steps 1,
    2 and 4 above; a new one is checked across the ranks of ``group``)."""
    device, index = bucket.buffer().device, bucket.index()
    current = state.buckets.get(index)
    found = current if current is not None and current.layout == layout.key else None
    if found is None:
        found = made_for(state.buckets, state.held, layout.key)
        if current is not None and sum(s is current for s in state.buckets.values()) == 1:
            state.held[current.layout] = current  # displaced: a later rebuild may bring it back
    if found is not None:
        state.held.pop(found.layout, None)
        state.buckets[index] = found
        if found.sketch.device != device:
            found.to(device)
        return found
    if current is not None:
        # DDP rebuilt its buckets with other members, or a checkpoint came from another layout.
        state.stats.state_resets += 1
        if state.iter > 1:  # DDP's own rebuild after iteration 0 is expected
            logger.warning(
                "bucket %d changed layout at iteration %d: state reset", index, state.iter
            )
    made = state.new_bucket_state(layout.key, layout.numel, device)
    check_agreement(index, state.agreement_fields(made), made.sketch.device, group)
    state.buckets[index] = made
    return made
