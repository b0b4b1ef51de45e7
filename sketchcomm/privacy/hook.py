r"""Differentially private sketched gradient communication: ``DPSketchState`` + ``dp_sketch_hook``.

Every step releases, for every bucket, the sum over contributions of clipped Count Sketch tables
plus Gaussian noise (:mod:`sketchcomm.privacy.mechanism`); everything the ranks compute afterwards
(recovery, sketch-space error and momentum, the model update) is post-processing of that release.
The privacy comes from the noise, never from the sketch: sketching alone is not differentially
private (Song et al., ICML 2023, reconstruct data from sketched gradients).

Two units of privacy:

``unit="example"`` (DP-SGD semantics)
    Neighbouring datasets differ in one training example. Each example's table of each bucket is
    clipped to ``C_b``; batches are drawn by Poisson sampling with rate ``q`` (Opacus's
    ``DistributedUniformWithReplacementSampler``), and the released sum is divided by the expected
    batch size ``q N``. The loss must *sum* over examples (``reduction="sum"``). Threat model: the
    adversary sees the released tables (and every model) but not a rank's local data, its
    per-example tables or its share of the noise; ranks are trusted to run the hook.

``unit="rank"`` (client level, cross-silo or federated)
    Neighbouring executions differ in one rank's whole data. Each rank's table of each bucket is
    clipped to ``C_b``; ``q`` is the probability that a rank takes part in a step (1 when all do).
    The released sum is divided by ``q W``. Threat model: the adversary sees the aggregate (the
    summed tables and the models), not individual ranks' messages, as under secure aggregation.

Noise (``noise``): ``"distributed"`` has every rank add ``N(0, sigma^2 C^2 / W)`` per cell from a
private generator seeded by the operating system, so the sum carries ``N(0, sigma^2 C^2)`` once;
``"single"`` has rank 0 add all of it. The ledger (:class:`~sketchcomm.privacy.PrivacyLedger`)
records each step exactly once, at the step's first bucket (DDP launches bucket 0 first) and
before that bucket's table leaves the process, so a backward pass that fails half-way still counts
as a step (over-reporting, never under-reporting); a step that would exceed the budget raises
:class:`~sketchcomm.privacy.PrivacyBudgetExceeded` on every rank before anything is released.
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sketchcomm.buckets import BucketLayout
from sketchcomm.hooks import SketchState, _nan_result
from sketchcomm.privacy.calibration import calibrate_noise_multiplier, describe_plan
from sketchcomm.privacy.capture import PerExampleGradients
from sketchcomm.privacy.ledger import PrivacyLedger
from sketchcomm.privacy.mechanism import (
    NOISE_PLACEMENTS,
    add_noise,
    bucket_clip_norm,
    clip_and_sum,
    private_generator,
)
from sketchcomm.recovery import BucketState, decode_table
from sketchcomm.validation import check_choice, check_float

__all__ = ["DPSketchState", "dp_sketch_hook"]

UNITS = ("example", "rank")


class DPSketchState(SketchState):
    r"""State of :func:`dp_sketch_hook`: a :class:`~sketchcomm.SketchState` plus the mechanism.

    Args:
        ledger: the privacy ledger; build it identically on every rank, with ``writer=True``
            on rank 0 only.
        max_grad_norm: clipping norm ``C`` of one contribution over all buckets.
        unit: ``"example"`` or ``"rank"`` (see the module docstring).
        sample_rate: ``q``; for ``"example"`` the Poisson sampling rate (expected global batch
            over dataset size), for ``"rank"`` the participation rate (default 1).
        dataset_size: ``N``, the number of examples (``"example"`` only); the update is divided by
            ``q N``.
        noise_multiplier: ``sigma``; or leave it out and give ``target_epsilon`` with ``steps`` or
            ``epochs`` to calibrate it with the ledger's accountant and delta.
        noise: ``"distributed"`` or ``"single"``.
        secure_mode: draw noise with Opacus's floating-point-attack-resistant sampler from a
            generator reseeded from the operating system every step.
        **sketch_options: the sketch options of :class:`~sketchcomm.SketchState` (``compression``,
            ``rows``, ``columns``, ``recovery``, ``topk_fraction``, ``momentum``,
            ``min_compression_size``, ``seed``, ``log_every``, ``process_group``). Error feedback
            is ``"sketch"`` (FetchSGD, on the aggregated noised table) or ``"none"``; a rank's own
            residual, and a second round of exact values, would release unnoised data. Buckets
            below ``min_compression_size`` are privatised uncompressed (an exact one-row table).

    Call :meth:`register` with the DDP model: it binds the parameters, installs per-example
    gradient capture for ``unit="example"`` and registers :func:`dp_sketch_hook`.
    """

    def __init__(
        self,
        ledger: PrivacyLedger,
        max_grad_norm: float,
        unit: str = "example",
        sample_rate: float | None = None,
        dataset_size: int | None = None,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        steps: int | None = None,
        epochs: float | None = None,
        noise: str = "distributed",
        secure_mode: bool = False,
        **sketch_options: Any,
    ) -> None:
        for forbidden in ("second_round", "start_iter", "nonfinite"):
            if forbidden in sketch_options:
                raise ValueError(f"{forbidden} cannot be set on a private state")
        if sketch_options.get("error_feedback") == "local":
            raise ValueError("error_feedback='local' keeps a rank's unnoised residual: not private")
        super().__init__(start_iter=0, **sketch_options)
        if not isinstance(ledger, PrivacyLedger):
            raise ValueError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
        check_float("max_grad_norm", max_grad_norm, 0.0, math.inf, open_low=True)
        check_choice("unit", unit, UNITS)
        if ledger.unit != unit:
            raise ValueError(f"the ledger accounts for unit={ledger.unit!r}, this state {unit!r}")
        check_choice("noise", noise, NOISE_PLACEMENTS)
        if unit == "example":
            if sample_rate is None or dataset_size is None:
                raise ValueError("unit='example' needs sample_rate and dataset_size")
            if not isinstance(dataset_size, int) or dataset_size < 1:
                raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
            if ledger.delta >= 1.0 / dataset_size:
                raise ValueError(
                    f"delta ({ledger.delta:g}) must be below 1/dataset_size ({1 / dataset_size:g})"
                )
        elif dataset_size is not None:
            raise ValueError("dataset_size is for unit='example' only")
        sample_rate = 1.0 if sample_rate is None else sample_rate
        check_float("sample_rate", sample_rate, 0.0, 1.0, open_low=True)
        if noise_multiplier is None:
            if target_epsilon is None:
                raise ValueError("give noise_multiplier, or target_epsilon with steps or epochs")
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon, ledger.delta, sample_rate, steps=steps, epochs=epochs,
                accountant=ledger.accountant,
            )  # fmt: skip
        elif target_epsilon is not None:
            raise ValueError("give either noise_multiplier or target_epsilon, not both")
        check_float("noise_multiplier", noise_multiplier, 0.0, math.inf, open_low=False)
        if not isinstance(secure_mode, bool):
            raise ValueError(f"secure_mode must be a bool, got {secure_mode!r}")

        self.ledger = ledger
        self.max_grad_norm = float(max_grad_norm)
        self.unit = unit
        self.sample_rate = float(sample_rate)
        self.dataset_size = dataset_size
        self.noise_multiplier = float(noise_multiplier)
        self.noise = noise
        self.secure_mode = secure_mode
        self._capture: PerExampleGradients | None = None
        self._total_elements = 0
        self._generator: torch.Generator | None = None
        self._checked_sums: set[int] = set()

    _CONFIG_KEYS = (
        *SketchState._CONFIG_KEYS,
        "max_grad_norm", "unit", "sample_rate", "dataset_size", "noise_multiplier", "noise",
        "secure_mode",
    )  # fmt: skip

    def describe(self, steps: int) -> str:
        """The privacy plan for ``steps`` steps, to print before training."""
        return describe_plan(
            self.noise_multiplier, self.sample_rate, steps, self.ledger.delta,
            self.ledger.accountant, unit=self.unit, budget=self.ledger.budget,
            dataset_size=self.dataset_size, secure_mode=self.secure_mode,
        )  # fmt: skip

    @property
    def normalizer(self) -> float:
        """The expected number of contributions per step: ``q N`` or ``q W``."""
        if self.unit == "example":
            return self.sample_rate * self.dataset_size
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return self.sample_rate * dist.get_world_size(group)

    def register(self, ddp_model: nn.Module, hook: Any = None) -> None:
        module = getattr(ddp_model, "module", ddp_model)
        self._total_elements = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if self.unit == "example":
            if self._capture is not None:
                self._capture.remove()
            self._capture = PerExampleGradients(module)
        super().register(ddp_model, dp_sketch_hook if hook is None else hook)

    def table_shape(self, numel: int) -> tuple[int, int]:
        # Every bucket is privatised: those not worth compressing get an exact one-row table.
        shape = super().table_shape(numel)
        return (1, numel) if shape is None else shape

    def _agreement_fields(self, index: int, state: BucketState) -> dict[str, float]:
        return {
            **super()._agreement_fields(index, state),
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "unit": float(UNITS.index(self.unit)),
            "noise": float(NOISE_PLACEMENTS.index(self.noise)),
        }

    def _open_step(self, device: torch.device) -> None:
        """Record the step in the ledger (persisted before it returns), before any release."""
        self.ledger.record_step(self.noise_multiplier, self.sample_rate)
        if self._generator is None or self.secure_mode or self._generator.device != device:
            self._generator = private_generator(device)

    def bucket_clip_norm(self, numel: int) -> float:
        """This bucket's clipping threshold ``C_b = C sqrt(d_b / D)``."""
        return bucket_clip_norm(self.max_grad_norm, numel, self._total_elements)

    def noise_std(self, rank: int, world: int) -> float:
        """This rank's share of the noise: ``sigma C / sqrt(W)``, or all of it on rank 0."""
        total = self.noise_multiplier * self.max_grad_norm
        if self.noise == "distributed":
            return total / math.sqrt(world)
        return total if rank == 0 else 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in ("ledger", "_capture", "_generator"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.ledger = None
        self._capture = None
        self._generator = None


def _per_example_tables(
    state: DPSketchState, bucket: dist.GradBucket, layout: BucketLayout, bs: BucketState
) -> Tensor:
    """``[B, r, c]`` tables of this rank's examples, checked once against the bucket's gradient."""
    assert state._capture is not None
    params = bucket.parameters()
    samples = torch.cat([state._capture.pop(params[i]).float() for i in layout.order], dim=1)
    if bucket.index() not in state._checked_sums:
        expected = layout.to_canonical(bucket.buffer()).float()
        error = (samples.sum(0) - expected).abs().max().item() if len(samples) else 0.0
        scale = expected.abs().max().item() + 1e-12
        if error > 1e-3 * scale + 1e-6:
            raise ValueError(
                f"per-example gradients of bucket {bucket.index()} do not add up to its gradient "
                f"(max difference {error:.3g}): zero the gradients before each backward, run one "
                "forward per backward (no accumulation under no_sync), and train only supported "
                "layers"
            )
        state._checked_sums.add(bucket.index())
    return bs.sketch.sketch_batch(samples)


def dp_sketch_hook(state: DPSketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: clip in sketch space, add Gaussian noise, allreduce, recover.

    For each bucket ``b`` with ``d_b`` elements, every rank computes the tables of its
    contributions (its examples, or itself), clips each to ``C_b = C sqrt(d_b / D)``, sums them,
    adds its share of ``N(0, sigma^2 C^2)`` per cell, and allreduces. The summed noisy table is
    decoded (top-k with sketch-space error feedback, or dense) and divided by the expected number
    of contributions. Returns a future of one tensor shaped and typed like ``bucket.buffer()``.
    """
    if state._positions is None:
        raise RuntimeError("register the state with state.register(ddp_model), not directly")
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    buffer = bucket.buffer()
    if bucket.index() == 0:  # DDP launches buckets in index order: this starts a step
        state._open_step(buffer.device)
    layout = BucketLayout.of(bucket, state._positions)
    bs = state._bucket_state(bucket, layout, group)
    clip = state.bucket_clip_norm(layout.numel)
    if state.unit == "example":
        tables = _per_example_tables(state, bucket, layout, bs)
    else:
        tables = bs.sketch.sketch(layout.to_canonical(buffer))[None]
    table, _ = clip_and_sum(tables, clip)
    add_noise(table, state.noise_std(rank, world), state._generator, state.secure_mode)

    full_bytes = buffer.numel() * buffer.element_size()
    state.stats.record(table.numel(), table.numel() * 4, buffer.numel(), full_bytes)
    state.stats.compressed_buckets += 1
    index, normalizer = bucket.index(), state.normalizer
    if bucket.is_last():
        state.end_iteration()

    def decode(f: torch.futures.Future) -> Tensor:
        summed = f.value()[0]
        if not torch.isfinite(summed).all():
            return _nan_result(state, index, buffer)
        update = (
            bs.sketch.estimate(summed) if bs.sketch.is_exact else decode_table(state, bs, summed)
        )
        return layout.from_canonical(update.div_(normalizer).to(buffer.dtype))

    fut = dist.all_reduce(table, group=group, async_op=True).get_future()
    return fut.then(decode)
