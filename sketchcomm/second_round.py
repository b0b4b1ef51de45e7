"""Sketched SGD's second round (Ivkin et al., NeurIPS 2019) for
[`sketch_hook()`][sketchcomm.sketch_hook]: allreduce the tables, pick ``m = candidates * k``
candidates from the summed table, allreduce their exact values and keep the ``k`` largest, with
local error feedback of what was not sent."""

# No "from __future__ import annotations": kept like hooks.py, whose hook DDP inspects at runtime.

from typing import Any

import torch
from torch import Tensor

from sketchcomm.engine import BucketContext
from sketchcomm.finite import tensor_is_finite
from sketchcomm.sketch_blocks import sketch_placed

__all__ = ["message_size", "part_message", "part_message_into", "second_round"]


def part_message(part: BucketContext, values: Tensor) -> Tensor:
    """What a part of a bucket sends: the table of ``values`` (its canonical vector), flat, or the
    values averaged over the ranks for a part without state (see
    [`BucketContext.parts()`][sketchcomm.engine.BucketContext.parts])."""
    if part.bucket_state is None:
        return values / part.world
    return part.sketch.sketch(values).reshape(-1)


def part_message_into(part: BucketContext, out: Tensor) -> Tensor:
    """`part_message()` of the part's canonical vector, written into ``out`` (zeros of
    [`message_size()`][sketchcomm.second_round.message_size]) and read straight from the bucket
    buffer at the part's [`placement`][sketchcomm.buckets.BucketLayout.placement]; returns
    ``out``."""
    placement = part.layout.placement
    if part.bucket_state is None:
        return torch.div(placement.gather(part.buffer).float(), part.world, out=out)
    return sketch_placed(part.sketch, part.buffer, placement, out.view(part.sketch.table_shape))


def message_size(part: BucketContext) -> int:
    if part.bucket_state is None:
        return part.layout.numel
    rows, columns = part.sketch.table_shape
    return rows * columns


def second_round(state: Any, context: BucketContext) -> torch.futures.Future[Tensor]:
    """Sketched SGD's second round: allreduce the table and wait, pick ``candidates`` coordinates
    from it, allreduce their exact values and keep the ``topk`` largest (part by part)."""
    config, parts = state.config, context.parts()
    sizes = [message_size(part) for part in parts]
    local: list[Tensor] = []

    def make_table() -> Tensor:
        for part in parts:
            values = part.canonical().float()
            residual = part.bucket_state.residual if part.bucket_state is not None else None
            if config.error_feedback == "local" and residual is not None:
                values = values + residual
            local.append(values)
        return torch.cat([part_message(p, v) for p, v in zip(parts, local, strict=True)])

    table = context.build((sum(sizes),), make_table)
    sketched = [part for part in parts if part.bucket_state is not None]
    candidates = [part.bucket_state.candidates for part in sketched]
    sent = table.numel() + sum(candidates)
    context.record(sent, sent * 4)
    summed = context.allreduce_now(table)
    if summed is None:
        return context.without_exchange(lambda: None)
    if not tensor_is_finite(summed):
        return context.without_exchange(context.nonfinite_result)
    pieces, chosen = summed.split(sizes), {}

    def make_exact() -> Tensor:
        for n, part in enumerate(parts):
            if part.bucket_state is not None:
                table_n = pieces[n].view(part.sketch.table_shape)
                chosen[n] = part.sketch.heavy_hitters(table_n, part.bucket_state.candidates)[0]
        return torch.cat([local[n][chosen[n]] for n in chosen]) if chosen else summed[:0]

    exact = context.build((sum(candidates),), make_exact)

    def finish(summed_exact: Tensor) -> Tensor:
        exact_pieces, results = iter(summed_exact.split(candidates)), []
        for n, part in enumerate(parts):
            if part.bucket_state is None:
                results.append(pieces[n])
                continue
            bucket_state, values = part.bucket_state, next(exact_pieces)
            keep = values.abs().topk(bucket_state.topk, sorted=False).indices
            indices = chosen[n][keep]
            if config.error_feedback == "local":
                residual = local[n].clone() if local[n] is part.buffer else local[n]
                residual[indices] = 0.0
                bucket_state.residual = residual
            result = torch.zeros(part.sketch.dim, dtype=torch.float32, device=part.buffer.device)
            result[indices] = values[keep] / context.world
            results.append(result)
        return torch.cat(results)

    return context.allreduce(exact, finish)
