"""One rank's whole hook step on a real model's gradient buckets, against PowerSGD rank 1.

A transformer of about 13.7M parameters (an 4096-token embedding, 3 ``nn.TransformerEncoderLayer``
of width 512, a 4096-way head) runs one backward under DDP on a world-size-1 gloo group; a
recording hook keeps every bucket of DDP's rebuilt layout (first bucket 1 MiB, the others 25 MiB)
with its gradients. Each variant then runs on those buckets, one step after the other:

* ``copy``: ``dst.copy_(buffer)`` for every bucket, the reference;
* ``powersgd``: PyTorch's own ``powerSGD_hook`` with ``matrix_approximation_rank=1`` (error
  feedback and warm start on, as by default), its compute being ``P = M Q``, orthogonalize,
  ``Q = M^T P``, the reconstruction ``P Q^T`` and the error, plus the allreduce of the
  uncompressed 1-D tensors;
* ``sketch`` on each kernel path (``numpy`` and ``compiled``): ``sketch_hook`` with ``rows`` rows
  at ``compression`` (top-k recovery with FetchSGD's sketch-space error feedback and momentum):
  the bucket to canonical order, the sketch, the allreduce of the table, the top-k recovery, the
  zeroed cells and the result in the bucket's order.

Both hooks are called on the recorded buckets (objects with the ``GradBucket`` methods the hooks
read) and their futures are waited for, so a step's time is its compute plus world-size-1 gloo
collectives (no network). Variants are interleaved per repeat and the median is kept; before
each call the buckets are restored to the recorded gradients (untimed), since both hooks write
their result over the bucket.
"""

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from sketchcomm import compiled
from sketchcomm.hooks import SketchState, sketch_hook
from sketchcomm.recovery import decode

__all__ = ["RecordedBucket", "hook_step_report", "markdown_hook_table", "record_buckets"]


@dataclass
class RecordedBucket:
    """A gradient bucket kept from DDP: what ``sketch_hook`` and ``powerSGD_hook`` read of a
    ``dist.GradBucket`` (``buffer`` is the flat gradient, ``gradients()`` views into it)."""

    number: int
    flat: Tensor
    params: list[nn.Parameter]
    last: bool

    def index(self) -> int:
        return self.number

    def buffer(self) -> Tensor:
        return self.flat

    def is_last(self) -> bool:
        return self.last

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def gradients(self) -> list[Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(self.flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views


def transformer(vocabulary: int = 4096, width: int = 512, layers: int = 3) -> nn.Module:
    """About 13.7M parameters at the defaults."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, nhead=8, dim_feedforward=4 * width, batch_first=True)
    return nn.Sequential(
        nn.Embedding(vocabulary, width),
        nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        nn.Linear(width, vocabulary),
    )


@contextmanager
def single_rank_group():
    """A world-size-1 gloo process group for the duration (the default group)."""
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def record_buckets(model: nn.Module) -> list[RecordedBucket]:
    """Two backward passes of ``model`` under DDP (the second after DDP's bucket rebuild), the
    buckets of the second as DDP hands them to a hook, with their gradients."""
    ddp = DistributedDataParallel(model)
    recorded: dict[int, RecordedBucket] = {}

    def record(_: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        recorded[bucket.index()] = RecordedBucket(
            bucket.index(), bucket.buffer().clone(), list(bucket.parameters()), bucket.is_last()
        )
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, record)
    tokens = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        ddp.zero_grad()
        ddp(tokens).float().pow(2).mean().backward()
    return [recorded[i] for i in sorted(recorded)]


def _step(hook: Callable, state: Any, buckets: list[RecordedBucket], *, together: bool) -> None:
    """Every bucket's hook in index order, as DDP launches them. With ``together`` every future is
    waited for at the end (the sketch hook releases a step's results together); else each one
    before the next hook (``powerSGD_hook`` issues collectives from its callbacks and blocks on
    them there, which on gloo's two worker threads can stall behind a later bucket's)."""
    futures = []
    for bucket in buckets:
        futures.append(hook(state, bucket))
        if not together:
            futures[-1].wait()
    for future in futures:
        future.wait()


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def kernel_path(path: str):
    """Run the sketch kernels on ``path`` (``compiled`` or ``numpy``) for the duration."""
    saved = os.environ.get(compiled.ENVIRONMENT_VARIABLE)
    os.environ[compiled.ENVIRONMENT_VARIABLE] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(compiled.ENVIRONMENT_VARIABLE, None)
        else:
            os.environ[compiled.ENVIRONMENT_VARIABLE] = saved


def hook_step_report(
    rows: int = 3,
    compression: float = 20.0,
    repeats: int = 20,
    warmup: int = 3,
    topk_fraction: float = 0.01,
) -> dict[str, Any]:
    """Median seconds per whole step of every variant and their ratios to the copy and to
    PowerSGD; the kernel paths are ``numpy`` and, where numba is installed, ``compiled``.
    ``topk_fraction`` is the sketch's ``k`` (1.0, every coordinate, is what the hook chooses for SGD
    with momentum and adaptive optimizers)."""
    with single_rank_group():
        model = transformer()
        buckets = record_buckets(model)
        targets = [torch.empty_like(b.flat) for b in buckets]
        power_state = powersgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2
        )
        paths = ["numpy", "compiled"] if compiled.numba is not None else ["numpy"]
        sketch_states = {}
        for path in paths:
            state = SketchState(
                compression=compression,
                rows=rows,
                error_feedback="sketch",
                momentum=0.9,
                topk_fraction=topk_fraction,
                start_iter=0,
            )
            state.bind(model)
            sketch_states[path] = state

        def copy() -> None:
            for target, bucket in zip(targets, buckets, strict=True):
                target.copy_(bucket.flat)

        variants: dict[str, Callable[[], None]] = {
            "copy": copy,
            "powersgd": lambda: _step(powersgd.powerSGD_hook, power_state, buckets, together=False),
        }
        for path in paths:
            state = sketch_states[path]

            def sketch_step(state: SketchState = state, path: str = path) -> None:
                with kernel_path(path):
                    _step(sketch_hook, state, buckets, together=True)

            variants[f"sketch ({path})"] = sketch_step
        kernel_states = [
            sketch_states[paths[-1]].new_bucket_state(("kernels", b.number), b.flat.numel(), None)
            for b in buckets
        ]
        decoding = sketch_states[paths[-1]].config.decoding

        def kernels_only() -> None:
            with kernel_path(paths[-1]):
                for bucket, bucket_state in zip(buckets, kernel_states, strict=True):
                    table = bucket_state.sketch.sketch(bucket.flat)
                    decode(decoding, bucket_state, table)

        variants[f"sketch kernels only ({paths[-1]})"] = kernels_only
        samples: dict[str, list[float]] = {name: [] for name in variants}
        gradients = [b.flat.clone() for b in buckets]
        for repeat in range(warmup + repeats):
            for name, fn in variants.items():
                for bucket, gradient in zip(buckets, gradients, strict=True):
                    bucket.flat.copy_(gradient)  # both hooks write their result over the bucket
                seconds = _seconds(fn)
                if repeat >= warmup:
                    samples[name].append(seconds)
        compressed = sketch_states[paths[0]].stats.compressed_buckets
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "buckets": [b.flat.numel() for b in buckets],
        "compressed_bucket_steps": compressed,
        "rows": rows,
        "compression": compression,
        "topk_fraction": topk_fraction,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "per_copy": {name: s / seconds["copy"] for name, s in seconds.items()},
        "per_powersgd": {name: s / seconds["powersgd"] for name, s in seconds.items()},
    }


def markdown_hook_table(report: dict[str, Any]) -> str:
    """The variants of a [`hook_step_report()`][benchmarks.hook_step.hook_step_report] as a
    Markdown table: milliseconds per step, copies, and PowerSGD rank 1's compute."""
    lines = ["| variant | ms per step | / copy | / PowerSGD rank 1 |", "|---|---|---|---|"]
    for name, seconds in report["seconds"].items():
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {report['per_copy'][name]:.1f}x | "
            f"{report['per_powersgd'][name]:.2f}x |"
        )
    return "\n".join(lines)
