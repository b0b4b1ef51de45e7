r"""Per-example contributions of a gradient bucket, ready when DDP fires it.

For ``unit="example"`` each rank contributes one Count Sketch table per example to each bucket:
:meth:`ExampleContributions.tables` gives the bucket's ``[B, r, c]`` tables, which the mechanism
clips and sums. The per-example gradients come from
:class:`~sketchcomm.privacy.capture.PerExampleGradients`, one parameter use at a time.

Streaming. The sketch is linear, so a parameter's per-example gradients ``[B, n]`` at offset
``o`` of its bucket (canonical order) are sketched into the bucket's tables as soon as they are
captured (:func:`~sketchcomm.sketch_blocks.sketch_block_into`) and dropped: the extra memory
is about ``B x largest layer + B x tables`` instead of ``B x bucket``. That needs the bucket
layout, known only once the engine has shown the bucket; DDP rebuilds its buckets after its first
iteration. So streaming starts once two consecutive steps had the same layouts; before that the
rows of each parameter are kept and sketched parameter by parameter when the bucket fires. A
bucket found with another layout than the one streamed for is refused (the step is cleared) and
the next steps keep rows again.

Micro-batches (gradient accumulation under DDP's ``no_sync``). Each forward pass with gradients
enabled is one micro-batch of different examples. Contributions accumulate from the first forward
after a release (or :meth:`~ExampleContributions.clear`) until the next release: a bucket's
tables are those of every example of every micro-batch whose backward reached the bucket, so the
mechanism clips each example once and the step is released (and recorded in the ledger) once.
A failed or refused step clears them.

Check. Every release checks, by linearity, that the unclipped tables add up to the sketch of the
bucket's own gradient, :math:`\|\sum_b S(g_b) - S(g)\| \le \tau \|S(g)\| + 10^{-6}`, which catches
gradients accumulated outside the capture (not zeroed before the first micro-batch, or zeroed
between micro-batches). The tolerance follows the lowest precision that produced the gradient
(the autocast dtype during the forward, or the gradient's own dtype):
:math:`\tau = \max(10^{-3}, 8 \epsilon)` with :math:`\epsilon` its machine epsilon (``1e-3`` for
float32, ``0.0625`` for bfloat16, ``0.0078`` for float16). Rows and tables are float32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sketchcomm.engine import BucketContext
from sketchcomm.privacy.capture import PerExampleGradients
from sketchcomm.sketch import CountSketch
from sketchcomm.sketch_blocks import sketch_block_into

__all__ = ["ExampleContributions", "sum_tolerance"]


def sum_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the bucket-sum check for a gradient computed in ``dtype``."""
    return max(1e-3, 8 * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class Slot:
    """Where a parameter lies: bucket ``index`` of layout ``key``, at ``offset`` (canonical)."""

    index: int
    key: tuple
    offset: int
    sketch: CountSketch


@dataclass
class MicroBatch:
    """One forward pass's examples: rows kept per parameter, tables streamed per bucket."""

    size: int
    dtype: torch.dtype = torch.float32
    rows: dict[Tensor, Tensor] = field(default_factory=dict)
    tables: dict[int, tuple[tuple, Tensor]] = field(default_factory=dict)
    streamed: set[Tensor] = field(default_factory=set)

    def held_bytes(self) -> int:
        held = [*self.rows.values(), *(table for _, table in self.tables.values())]
        return sum(t.numel() * t.element_size() for t in held)


def _lower_precision(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _missing(param: Tensor) -> RuntimeError:
    return RuntimeError(
        "no per-example gradient was captured for a parameter of shape "
        f"{tuple(param.shape)}: was the model's forward run through the registered model "
        "before backward?"
    )


def _check_sum(index: int, total: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    """Refuse unless the per-example contributions add up to the bucket's gradient (both in
    table space, or both in gradient space) within :func:`sum_tolerance` of ``dtype``."""
    error, scale = (total - expected).norm().item(), expected.norm().item()
    tolerance = sum_tolerance(dtype)
    if error > tolerance * scale + 1e-6:
        raise ValueError(
            f"per-example gradients of bucket {index} do not add up to its gradient (relative "
            f"difference {error / (scale + 1e-12):.3g}, tolerance {tolerance:g} for {dtype}): "
            "zero the gradients before the first micro-batch of a step and not between its "
            "micro-batches, run every forward through the registered model, and train only "
            "supported layers"
        )


class ExampleContributions:
    """The per-example tables of every bucket of ``model`` (see the module docstring).

    ``peak_bytes`` is the most bytes of per-example tensors held at once (rows, tables and the
    use being sketched) since construction or :meth:`reset_peak`.

    >>> import torch
    >>> from torch import nn
    >>> contributions = ExampleContributions(nn.Linear(3, 2))
    >>> contributions.held_bytes(), contributions.streaming
    (0, False)
    >>> contributions.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self.capture = PerExampleGradients(model, receiver=self.receive)
        self.pending: dict[int, MicroBatch] = {}
        self.plan: dict[Tensor, Slot] | None = None
        self.next_plan: dict[Tensor, Slot] | None = None
        self.seen: dict[int, tuple[tuple, list[Tensor], list[int], CountSketch]] = {}
        self.last_keys: dict[int, tuple] | None = None
        self.peak_bytes = 0

    @property
    def streaming(self) -> bool:
        """True when captured gradients are sketched at once (the bucket layouts are known)."""
        return self.plan is not None

    def held_bytes(self) -> int:
        """Bytes of per-example rows and tables held now."""
        return sum(batch.held_bytes() for batch in self.pending.values())

    def reset_peak(self) -> None:
        self.peak_bytes = self.held_bytes()

    def receive(self, param: Tensor, rows: Tensor, forward: int, dtype: torch.dtype) -> None:
        """Take one use's per-example gradients ``[B, numel]`` of ``param`` (see
        :data:`~sketchcomm.privacy.capture.Receiver`): sketch them into their bucket's tables
        when the layout is known, else keep them."""
        batch = self.pending.get(forward)
        if batch is None:
            self.plan = self.next_plan  # a plan changes between forward passes only
            batch = self.pending[forward] = MicroBatch(len(rows))
        batch.dtype = _lower_precision(batch.dtype, dtype)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes() + rows.numel() * 4)
        slot = None if self.plan is None else self.plan.get(param)
        if slot is None:
            previous = batch.rows.get(param)
            batch.rows[param] = rows if previous is None else previous + rows
        else:
            if slot.index not in batch.tables:
                zeros = torch.zeros((len(rows), *slot.sketch.table_shape), device=rows.device)
                batch.tables[slot.index] = (slot.key, zeros.to(slot.sketch.device))
            sketch_block_into(slot.sketch, rows, slot.offset, batch.tables[slot.index][1])
            batch.streamed.add(param)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    def tables(self, context: BucketContext) -> Tensor:
        """``[n, r, c]`` unclipped tables of this rank's examples for the bucket, over every
        micro-batch since the last release, checked against the bucket's gradient."""
        index, layout, sketch = context.bucket.index(), context.layout, context.sketch
        params = context.bucket.parameters()
        ordered = [params[i] for i in layout.order]
        offsets = [0]
        for p in ordered[:-1]:
            offsets.append(offsets[-1] + p.numel())
        self.seen[index] = (layout.key, ordered, offsets, sketch)
        parts, dtype = [], context.buffer.dtype
        for forward in sorted(self.pending):
            batch = self.pending[forward]
            part = self._bucket_part(batch, index, layout.key, ordered, offsets, sketch)
            if part is not None:
                parts.append(part)
                dtype = _lower_precision(dtype, batch.dtype)
            if not (batch.rows or batch.tables or batch.streamed):
                del self.pending[forward]
        if context.bucket.is_last():
            self._end_step()
        tables = torch.cat(parts) if parts else torch.zeros((0, *sketch.table_shape))
        tables = tables.to(sketch.device)
        _check_sum(index, tables.sum(0), sketch.sketch(context.canonical()), dtype)
        return tables

    def rows(self, context: BucketContext) -> Tensor:
        """``[n, d]`` per-example gradients of the bucket (canonical order) over every
        micro-batch since the last release, checked against the bucket's gradient, for
        mechanisms that clip in gradient space. A model whose rows are asked for never streams
        (its layouts are not recorded)."""
        params = context.bucket.parameters()
        ordered = [params[i] for i in context.layout.order]
        parts, dtype = [], context.buffer.dtype
        for forward in sorted(self.pending):
            batch = self.pending[forward]
            present = [p in batch.rows for p in ordered]
            if any(present):
                if not all(present):
                    raise _missing(ordered[present.index(False)])
                parts.append(torch.cat([batch.rows.pop(p) for p in ordered], 1))
                dtype = _lower_precision(dtype, batch.dtype)
            if not (batch.rows or batch.tables or batch.streamed):
                del self.pending[forward]
        rows = torch.cat(parts) if parts else torch.zeros(0, context.layout.numel)
        _check_sum(context.bucket.index(), rows.sum(0), context.canonical().float(), dtype)
        return rows

    def _bucket_part(
        self,
        batch: MicroBatch,
        index: int,
        key: tuple,
        ordered: list[Tensor],
        offsets: list[int],
        sketch: CountSketch,
    ) -> Tensor | None:
        """One micro-batch's ``[B, r, c]`` tables of the bucket (rows sketched parameter by
        parameter and dropped), or None when its backward did not reach the bucket."""
        present = [p in batch.rows or p in batch.streamed for p in ordered]
        if not any(present):
            return None
        if not all(present):
            raise _missing(ordered[present.index(False)])
        streamed_key, table = batch.tables.pop(index, (key, None))
        if streamed_key != key:
            self.plan = self.next_plan = self.last_keys = None
            raise ValueError(
                f"bucket {index} changed its parameters after its per-example gradients were "
                "sketched for the old layout: the step is refused; the next steps keep rows "
                "until the layout is stable again"
            )
        if table is None:
            table = sketch.zeros().expand(batch.size, -1, -1).contiguous()
        for p, offset in zip(ordered, offsets, strict=True):
            rows = batch.rows.pop(p, None)
            if rows is not None:
                sketch_block_into(sketch, rows, offset, table)
        batch.streamed.difference_update(ordered)
        return table

    def _end_step(self) -> None:
        """After a step's last bucket: stream from the next forward once the layouts repeat."""
        keys = {index: seen[0] for index, seen in self.seen.items()}
        if keys == self.last_keys:
            self.next_plan = {
                p: Slot(index, key, offset, sketch)
                for index, (key, ordered, offsets, sketch) in self.seen.items()
                for p, offset in zip(ordered, offsets, strict=True)
            }
        else:
            self.next_plan = None
        self.last_keys, self.seen = keys, {}

    def clear(self) -> None:
        """Drop every captured row and table (a failed or refused step)."""
        self.capture.clear()
        self.pending.clear()
        self.seen = {}

    def remove(self) -> None:
        """Detach the capture's hooks."""
        self.capture.remove()
        self.pending.clear()
