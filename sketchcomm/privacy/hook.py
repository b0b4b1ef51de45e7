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

Noise placement (``noise_placement``): ``"distributed"`` has every rank add ``N(0, sigma^2 C^2 /
W)`` per cell from a private generator seeded by the operating system, so the sum carries ``N(0,
sigma^2 C^2)`` once; ``"single"`` has rank 0 add all of it. The ledger
(:class:`~sketchcomm.privacy.PrivacyLedger`) records each step exactly once, at the step's first
bucket (DDP launches bucket 0 first) and before that bucket's table leaves the process, so a
backward pass that fails half-way still counts as a step (over-reporting, never under-reporting); a
step that would exceed the budget raises :class:`~sketchcomm.privacy.PrivacyBudgetExceeded` on every
rank before anything is released.
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sketchcomm.engine import BucketContext, resolve_group
from sketchcomm.hooks import SketchState
from sketchcomm.privacy.calibration import calibrate_noise_multiplier, describe_plan
from sketchcomm.privacy.contributions import ExampleContributions
from sketchcomm.privacy.ledger import PrivacyLedger
from sketchcomm.privacy.mechanism import (
    NOISE_PLACEMENTS,
    add_noise,
    bucket_clip_norm,
    clip_and_sum,
    private_generator,
)
from sketchcomm.recovery import decode_or_exact
from sketchcomm.validation import check_choice, check_float

__all__ = ["DPSketchState", "PrivacyConfig", "dp_sketch_hook"]

UNITS = ("example", "rank")


@dataclass(frozen=True)
class PrivacyConfig:
    """The mechanism of :func:`dp_sketch_hook`, validated and frozen (see :class:`DPSketchState`
    for what each field means; ``noise_multiplier`` is already calibrated).

    >>> PrivacyConfig(max_grad_norm=1.0, unit="rank", sample_rate=1.0, dataset_size=None,
    ...               noise_multiplier=0.8).noise_placement
    'distributed'
    """

    max_grad_norm: float
    unit: str
    sample_rate: float
    dataset_size: int | None
    noise_multiplier: float
    noise_placement: str = "distributed"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        check_float("max_grad_norm", self.max_grad_norm, 0.0, math.inf, open_low=True)
        check_choice("unit", self.unit, UNITS)
        check_choice("noise_placement", self.noise_placement, NOISE_PLACEMENTS)
        if self.unit == "example":
            if self.dataset_size is None:
                raise ValueError("unit='example' needs sample_rate and dataset_size")
            if not isinstance(self.dataset_size, int) or self.dataset_size < 1:
                raise ValueError(
                    f"dataset_size must be a positive integer, got {self.dataset_size!r}"
                )
        elif self.dataset_size is not None:
            raise ValueError("dataset_size is for unit='example' only")
        check_float("sample_rate", self.sample_rate, 0.0, 1.0, open_low=True)
        check_float("noise_multiplier", self.noise_multiplier, 0.0, math.inf, open_low=False)
        if not isinstance(self.secure_mode, bool):
            raise ValueError(f"secure_mode must be a bool, got {self.secure_mode!r}")
        for name in ("max_grad_norm", "sample_rate", "noise_multiplier"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def agreement_fields(self) -> dict[str, float]:
        """The mechanism as numbers, for the cross-rank agreement check."""
        return {
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "unit": float(UNITS.index(self.unit)),
            "noise_placement": float(NOISE_PLACEMENTS.index(self.noise_placement)),
        }


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
        noise_placement: ``"distributed"`` or ``"single"``.
        secure_mode: draw noise with Opacus's floating-point-attack-resistant sampler from a
            generator reseeded from the operating system every step.
        **sketch_options: the sketch options of :class:`~sketchcomm.SketchState` (``compression``,
            ``rows``, ``columns``, ``recovery``, ``topk_fraction``, ``momentum``,
            ``min_compression_size``, ``seed``, ``log_every``, ``process_group``). Error feedback
            is ``"sketch"`` (FetchSGD, on the aggregated noised table) or ``"none"``; a rank's own
            residual, and a second round of exact values, would release unnoised data. Buckets
            below ``min_compression_size`` are privatised uncompressed (an exact one-row table).

    Call :meth:`register` with the DDP model: it binds the parameters, installs per-example
    gradient capture for ``unit="example"`` and registers :func:`dp_sketch_hook`. The hook asks
    the state for every bucket's clipping norm (:meth:`bucket_clip_norm`) and noise share
    (:meth:`noise_std`).

    >>> import os, tempfile, torch.distributed as dist
    >>> from sketchcomm.privacy import PrivacyLedger
    >>> folder = tempfile.mkdtemp()
    >>> store = dist.FileStore(os.path.join(folder, "store"), 1)
    >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    >>> ledger = PrivacyLedger("rdp", 1e-5, unit="rank", path=os.path.join(folder, "ledger.json"))
    >>> model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2))
    >>> state = DPSketchState(ledger, max_grad_norm=1.0, unit="rank", noise_multiplier=1.0)
    >>> state.register(model)
    >>> model(torch.randn(4, 8)).sum().backward()
    >>> ledger.steps, state.bucket_clip_norm(18), state.noise_std(rank=0, world=1)
    (1, 1.0, 1.0)
    >>> dist.destroy_process_group()
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
        noise_placement: str = "distributed",
        secure_mode: bool = False,
        **sketch_options: Any,
    ) -> None:
        if "noise" in sketch_options:
            raise ValueError("noise= is now noise_placement= ('distributed' or 'single')")
        for forbidden in ("second_round", "start_iter", "nonfinite", "exact_small_buckets"):
            if forbidden in sketch_options:
                raise ValueError(f"{forbidden} cannot be set on a private state")
        if sketch_options.get("error_feedback") == "local":
            raise ValueError("error_feedback='local' keeps a rank's unnoised residual: not private")
        super().__init__(start_iter=0, exact_small_buckets=True, **sketch_options)
        if not isinstance(ledger, PrivacyLedger):
            raise ValueError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
        check_choice("unit", unit, UNITS)
        if ledger.unit != unit:
            raise ValueError(f"the ledger accounts for unit={ledger.unit!r}, this state {unit!r}")
        if unit == "example" and (sample_rate is None or dataset_size is None):
            raise ValueError("unit='example' needs sample_rate and dataset_size")
        positive_size = isinstance(dataset_size, int) and dataset_size >= 1
        if unit == "example" and positive_size and ledger.delta >= 1.0 / dataset_size:
            raise ValueError(
                f"delta ({ledger.delta:g}) must be below 1/dataset_size ({1 / dataset_size:g})"
            )
        sample_rate = 1.0 if sample_rate is None else sample_rate
        if noise_multiplier is None:
            if target_epsilon is None:
                raise ValueError("give noise_multiplier, or target_epsilon with steps or epochs")
            check_float("sample_rate", sample_rate, 0.0, 1.0, open_low=True)
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon,
                ledger.delta,
                sample_rate,
                steps=steps,
                epochs=epochs,
                accountant=ledger.accountant,
            )
        elif target_epsilon is not None:
            raise ValueError("give either noise_multiplier or target_epsilon, not both")
        self.privacy = PrivacyConfig(
            max_grad_norm,
            unit,
            sample_rate,
            dataset_size,
            noise_multiplier,
            noise_placement,
            secure_mode,
        )
        self.ledger = ledger
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.contributions: ExampleContributions | None = None
        self.total_elements = 0
        self.generator: torch.Generator | None = None

    @property
    def max_grad_norm(self) -> float:
        return self.privacy.max_grad_norm

    @property
    def noise_multiplier(self) -> float:
        return self.privacy.noise_multiplier

    @property
    def unit(self) -> str:
        return self.privacy.unit

    @property
    def sample_rate(self) -> float:
        return self.privacy.sample_rate

    def describe(self, steps: int) -> str:
        """The privacy plan for ``steps`` steps, to print before training."""
        p = self.privacy
        return describe_plan(
            p.noise_multiplier,
            p.sample_rate,
            steps,
            self.ledger.delta,
            self.ledger.accountant,
            unit=p.unit,
            budget=self.ledger.budget,
            dataset_size=p.dataset_size,
            secure_mode=p.secure_mode,
        )

    @property
    def normalizer(self) -> float:
        """The expected number of contributions per step: ``q N`` or ``q W``."""
        if self.privacy.unit == "example":
            return self.privacy.sample_rate * self.privacy.dataset_size
        return self.privacy.sample_rate * dist.get_world_size(resolve_group(self.process_group))

    def register(self, ddp_model: nn.Module, hook: Any = None) -> None:
        module = getattr(ddp_model, "module", ddp_model)
        self.total_elements = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if self.privacy.unit == "example":
            if self.contributions is not None:
                self.contributions.remove()
            self.contributions = ExampleContributions(module)
        super().register(ddp_model, dp_sketch_hook if hook is None else hook)

    def agreement_fields(self, bucket: Any) -> dict[str, float]:
        return {**super().agreement_fields(bucket), **self.privacy.agreement_fields()}

    def open_step(self, device: torch.device) -> None:
        """Record the step in the ledger (persisted before it returns), before any release."""
        self.ledger.record_step(self.privacy.noise_multiplier, self.privacy.sample_rate)
        if self.generator is None or self.privacy.secure_mode or self.generator.device != device:
            self.generator = private_generator(device)

    def bucket_clip_norm(self, numel: int) -> float:
        """The clipping norm ``C_b = C sqrt(d_b / D)`` of a bucket of ``numel`` elements."""
        return bucket_clip_norm(self.privacy.max_grad_norm, numel, self.total_elements)

    def noise_std(self, rank: int, world: int) -> float:
        """This rank's share of the noise: ``sigma C / sqrt(W)``, or all of it on rank 0."""
        total = self.privacy.noise_multiplier * self.privacy.max_grad_norm
        if self.privacy.noise_placement == "distributed":
            return total / math.sqrt(world)
        return total if rank == 0 else 0.0

    def add_noise(self, values: Tensor, std: float) -> Tensor:
        """Add ``N(0, std^2)`` to ``values`` in place from this rank's private generator."""
        return add_noise(values, std, self.generator, self.privacy.secure_mode)

    def discard_step(self) -> None:
        if self.contributions is not None:
            self.contributions.clear()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_config(self) -> dict[str, Any]:
        return {**super().checkpoint_config(), **asdict(self.privacy)}

    def migrate_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        saved = dict(saved)
        if "noise" in saved:  # checkpoints before the rename of noise to noise_placement
            saved.setdefault("noise_placement", saved.pop("noise"))
        saved.setdefault("exact_small_buckets", True)
        return super().migrate_config(saved)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "privacy": self.privacy}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.privacy = state["privacy"]
        self.ledger = None
        self._init_runtime()
        super().__setstate__(state)


def private_tables(state: DPSketchState, context: BucketContext) -> Tensor:
    """``[n, r, c]`` tables of this rank's contributions to the bucket: its examples, or itself."""
    if state.privacy.unit == "rank":
        return context.sketch.sketch(context.canonical())[None]
    if state.contributions is None:
        raise RuntimeError("register the state with state.register(ddp_model), not directly")
    return state.contributions.tables(context)


def dp_sketch_hook(state: DPSketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: clip in sketch space, add Gaussian noise, allreduce, recover.

    For each bucket ``b`` with ``d_b`` elements, every rank computes the tables of its
    contributions (its examples, or itself), clips each to ``C_b = C sqrt(d_b / D)``, sums them,
    adds its share of ``N(0, sigma^2 C^2)`` per cell, and allreduces. The summed noisy table is
    decoded (top-k with sketch-space error feedback, or dense) and divided by the expected number
    of contributions. Returns a future of one tensor shaped and typed like ``bucket.buffer()``.
    If the step is refused (budget) or fails on any rank, every rank raises, and the step's raw
    gradients are cleared first (``p.grad = None``, see :mod:`sketchcomm.engine`).
    """
    if state.positions is None:
        raise RuntimeError("register the state with state.register(ddp_model), not directly")
    context = state.open(bucket)
    sketch = context.sketch

    def make_table() -> Tensor:
        if bucket.index() == 0:  # DDP launches buckets in index order: this starts a step
            state.open_step(context.buffer.device)
        clip = state.bucket_clip_norm(context.layout.numel)
        table, _ = clip_and_sum(private_tables(state, context), clip)
        return state.add_noise(table, state.noise_std(context.rank, context.world))

    table = context.build(sketch.table_shape, make_table)
    context.record(table.numel(), table.numel() * 4)
    decoding, bucket_state, normalizer = (
        state.config.decoding,
        context.bucket_state,
        state.normalizer,
    )
    return context.allreduce(
        table, lambda summed: decode_or_exact(decoding, bucket_state, summed).div_(normalizer)
    )
