r"""Differentially private sketched gradient communication: ``DPSketchState`` + ``dp_sketch_hook``.

Every step releases, for every bucket, the sum over contributions of clipped Count Sketch tables
plus Gaussian noise ([`sketchcomm.privacy.mechanism`][sketchcomm.privacy.mechanism]); everything the
ranks compute afterwards (recovery, sketch-space error and momentum, the model update) is
post-processing of that release. The privacy comes from the noise, never from the sketch: sketching
alone is not differentially private (Song et al., ICML 2023, reconstruct data from sketched
gradients).

Two units of privacy:

``unit="example"`` (DP-SGD semantics)
    Neighbouring datasets differ in one training example. Each example's table of each bucket is
    clipped to ``C_b``; batches are drawn by Poisson sampling with rate ``q`` from the operating
    system's randomness (the caller's data loader), and the released sum is divided by the
    expected batch size ``q N``. The loss must *sum* over examples (``reduction="sum"``). The
    model is checked at registration
    ([`sketchcomm.privacy.model_checks`][sketchcomm.privacy.model_checks]: no batch statistics, no
    time-major layers, no changing buffers) and every captured row must be one example (the capture
    refuses folded or time-major rows in the forward).

``unit="rank"`` (client level, cross-silo or federated)
    Neighbouring executions differ in one rank's whole data. Each rank's table of each bucket is
    clipped to ``C_b``. With ``q < 1`` each rank takes part in a step with secret probability
    ``q``, drawn at the step's first bucket from its own operating-system randomness; a rank
    that sits out sends a table of its noise share only. The released sum is divided by ``q W``.

Threat model: ``colluding_ranks = t`` ranks may pool their own noise shares against the others
(default 0 for ``"example"``, ``W - 1`` for ``"rank"``). With ``noise_placement="distributed"``
each rank adds ``N(0, sigma^2 C^2 / (W - t))`` per cell from a private generator, so after any
``t`` shares are removed ``N(0, sigma^2 C^2)`` remains: the ledger's ``epsilon`` holds towards
outside observers and any ``t`` colluding ranks, and ``outsider_epsilon`` (multiplier
``sigma sqrt(W / (W - t))``) towards outside observers only. ``"single"`` (rank 0 adds all the
noise) is refused for ``unit="rank"`` and for ``t >= 1``. A rank sees the aggregate and the
models, never another rank's table unless it reads the allreduce's messages (which carry partial
sums: only ``t = W - 1`` holds against that). In ``secure_mode`` every draw comes from the
operating system's CSPRNG ([`secure_gaussian()`][sketchcomm.privacy.mechanism.secure_gaussian]);
otherwise from a Mersenne Twister seeded from it. The ledger and the state must agree on both.

The ledger ([`PrivacyLedger`][sketchcomm.privacy.PrivacyLedger]) records each step exactly once, at
the step's first bucket (DDP launches bucket 0 first) and before that bucket's table leaves the
process, so a backward pass that fails half-way still counts as a step (over-reporting, never
under-reporting); a step that would exceed the budget, or a model whose buffers changed in the first
forward, raises on every rank before anything is released, and the raw gradients are cleared.
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

import os
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sketchcomm.engine import BucketContext, resolve_group
from sketchcomm.hooks import SketchState
from sketchcomm.privacy.calibration import calibrate_noise_multiplier, describe_plan
from sketchcomm.privacy.config import UNITS, PrivacyConfig
from sketchcomm.privacy.contributions import ExampleContributions
from sketchcomm.privacy.ledger import PrivacyLedger
from sketchcomm.privacy.mechanism import (
    add_noise,
    bucket_clip_norm,
    clip_and_sum,
    noise_share_std,
    outsider_noise_multiplier,
    private_generator,
    resolve_colluding_ranks,
)
from sketchcomm.privacy.model_checks import BufferWatch, validate_private_model
from sketchcomm.recovery import decode_or_exact
from sketchcomm.validation import check_choice, check_float

__all__ = ["DPSketchState", "PrivacyConfig", "dp_sketch_hook"]


class DPSketchState(SketchState):
    r"""State of [`dp_sketch_hook()`][sketchcomm.privacy.hook.dp_sketch_hook]: a
    [`SketchState`][sketchcomm.SketchState] plus the mechanism.

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
        noise_placement: ``"distributed"`` or ``"single"`` (refused for ``unit="rank"`` and
            for ``colluding_ranks >= 1``).
        secure_mode: draw every noise cell from the operating system's CSPRNG, as a sum of
            draws against floating-point attacks; must equal ``ledger.secure_mode``.
        colluding_ranks: ``t``, the ranks that may pool their noise shares against the others
            (``None``: 0 for ``"example"``, ``W - 1`` for ``"rank"``), resolved at
            `register()`. Each rank adds ``sigma^2 C^2 / (W - t)`` per cell. A ledger that
            states ``colluding_ranks`` must state the same ``t``; one that leaves it ``None``
            is accepted (its file then does not record ``t``; pass it to both to record it).
        **sketch_options: the sketch options of [`SketchState`][sketchcomm.SketchState]
            (``compression``, ``rows``, ``columns``, ``recovery``, ``topk_fraction``, ``momentum``,
            ``min_compression_size``, ``seed``, ``log_every``, ``process_group``). Error feedback is
            ``"sketch"`` (FetchSGD, on the aggregated noised table) or ``"none"``; a rank's own
            residual, and a second round of exact values, would release unnoised data. Buckets below
            ``min_compression_size`` are privatised uncompressed (an exact one-row table).

    Call `register()` with the DDP model: it resolves the threat model with the world size,
    refuses models that would void the guarantee, binds the parameters, installs per-example
    gradient capture for ``unit="example"`` and registers
    [`dp_sketch_hook()`][sketchcomm.privacy.hook.dp_sketch_hook]. The hook asks the state for every
    bucket's clipping norm (`bucket_clip_norm()`) and noise share (`noise_std()`).

    >>> import gc, os, tempfile, torch.distributed as dist
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
    >>> state.privacy.colluding_ranks
    0
    >>> dist.barrier(); del model, state; _ = gc.collect()  # the model and state go first,
    >>> dist.destroy_process_group()  # then the group (its threads idle)
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
        colluding_ranks: int | None = None,
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
        if ledger.secure_mode != secure_mode:
            raise ValueError(
                f"the ledger declares secure_mode={ledger.secure_mode}, this state "
                f"secure_mode={secure_mode}: build both with the same secure_mode"
            )
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
            colluding_ranks,
        )
        self.ledger = ledger
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.contributions: ExampleContributions | None = None
        self.total_elements = 0
        self.generator: torch.Generator | None = None
        self.buffer_watch: BufferWatch | None = None
        self.broadcast_buffers = False
        self.world_size: int | None = None
        self.participating = True

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
            world_size=self.world_size,
            colluding_ranks=p.colluding_ranks,
            noise_placement=p.noise_placement,
        )

    @property
    def normalizer(self) -> float:
        """The expected number of contributions per step: ``q N`` or ``q W``."""
        if self.privacy.unit == "example":
            return self.privacy.sample_rate * self.privacy.dataset_size
        return self.privacy.sample_rate * dist.get_world_size(resolve_group(self.process_group))

    def register(self, ddp_model: nn.Module, hook: Any = None) -> None:
        """Resolve the threat model, refuse models that would void the guarantee (batch
        statistics, time-major layers, changing buffers: see
        [`validate_private_model()`][sketchcomm.privacy.model_checks.validate_private_model]),
        install the capture
        and a [`BufferWatch`][sketchcomm.privacy.model_checks.BufferWatch], register the hook."""
        module = getattr(ddp_model, "module", ddp_model)
        self.broadcast_buffers = bool(getattr(ddp_model, "broadcast_buffers", False))
        validate_private_model(module, self.privacy.unit, self.broadcast_buffers)
        world = dist.get_world_size(resolve_group(self.process_group))
        privacy = self.privacy.resolved(world)
        ledger_t = self.ledger.colluding_ranks if self.ledger is not None else None
        if ledger_t is not None and ledger_t != privacy.colluding_ranks:
            raise ValueError(
                f"the ledger states colluding_ranks={ledger_t}, this state resolves "
                f"colluding_ranks={privacy.colluding_ranks} at world size {world}: build both "
                "with the same colluding_ranks"
            )
        self.privacy, self.world_size = privacy, world
        self.total_elements = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if self.contributions is not None:
            self.contributions.remove()
            self.contributions = None
        if self.privacy.unit == "example":
            self.contributions = ExampleContributions(module)
        self.buffer_watch = BufferWatch(module)
        super().register(ddp_model, dp_sketch_hook if hook is None else hook)

    def agreement_fields(self, bucket: Any) -> dict[str, float]:
        return {**super().agreement_fields(bucket), **self.privacy.agreement_fields()}

    def open_step(self, device: torch.device) -> None:
        """Start a step, before any release: at the first step refuse buffers that changed in
        the forward; record the step in the ledger (persisted before it returns); for
        ``unit="rank"`` with ``q < 1`` draw this rank's secret participation."""
        p = self.privacy
        if self.world_size is None or p.colluding_ranks is None:
            raise RuntimeError("register the state with state.register(ddp_model), not directly")
        if self.buffer_watch is not None:
            self.buffer_watch.refuse_changed(p.unit, self.broadcast_buffers)
            self.buffer_watch = None
        outsider = outsider_noise_multiplier(
            p.noise_multiplier, self.world_size, p.noise_placement, p.colluding_ranks
        )
        self.ledger.record_step(
            p.noise_multiplier, p.sample_rate, outsider_noise_multiplier=outsider
        )
        if not p.secure_mode and (self.generator is None or self.generator.device != device):
            self.generator = private_generator(device)
        self.participating = p.unit == "example" or self.draw_participation()

    def draw_participation(self) -> bool:
        """Bernoulli(``q``) from the operating system's randomness (never a shared seed)."""
        if self.privacy.sample_rate >= 1.0:
            return True
        return int.from_bytes(os.urandom(8), "little") < self.privacy.sample_rate * 2.0**64

    def bucket_clip_norm(self, numel: int) -> float:
        """The clipping norm ``C_b = C sqrt(d_b / D)`` of a bucket of ``numel`` elements."""
        return bucket_clip_norm(self.privacy.max_grad_norm, numel, self.total_elements)

    def noise_std(self, rank: int, world: int) -> float:
        """This rank's share of the noise: ``sigma C / sqrt(W - t)``, or all of it on rank 0
        ([`noise_share_std()`][sketchcomm.privacy.mechanism.noise_share_std])."""
        p = self.privacy
        t = resolve_colluding_ranks(p.colluding_ranks, p.unit, world)
        return noise_share_std(
            p.noise_multiplier, p.max_grad_norm, rank, world, p.noise_placement, t
        )

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
        saved.setdefault("colluding_ranks", 0)  # older checkpoints: shares sigma^2 C^2 / W
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
        own = context.sketch.sketch(context.canonical())[None]
        return own if state.participating else own[:0]  # sitting out: noise only
    if state.contributions is None:
        raise RuntimeError("register the state with state.register(ddp_model), not directly")
    return state.contributions.tables(context)


def dp_sketch_hook(state: DPSketchState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    r"""DDP communication hook: clip in sketch space, add Gaussian noise, allreduce, recover.

    For each bucket ``b`` with ``d_b`` elements, every rank computes the tables of its
    contributions (its examples, or itself; nothing when it sits out a step), clips each to
    ``C_b = C sqrt(d_b / D)``, sums them, adds its share ``N(0, sigma^2 C^2 / (W - t))`` per
    cell, and allreduces. The summed noisy table is decoded (top-k with sketch-space error
    feedback, or dense) and divided by the expected number of contributions. Returns a future
    of one tensor shaped and typed like ``bucket.buffer()``. If the step is refused (budget,
    changed buffers) or fails on any rank, every rank raises, and the step's raw gradients are
    cleared first (``p.grad = None``, see [`sketchcomm.engine`][sketchcomm.engine]).
    """
    if state.positions is None:
        raise RuntimeError("register the state with state.register(ddp_model), not directly")
    context = state.open(bucket, split=True)
    parts = context.parts()  # several after a restart: see sketchcomm.bucket_states
    sizes = [torch.Size(part.sketch.table_shape).numel() for part in parts]

    def make_table() -> Tensor:
        if bucket.index() == 0:  # DDP launches buckets in index order: this starts a step
            state.open_step(context.buffer.device)
        std, tables = state.noise_std(context.rank, context.world), []
        for part in parts:
            clip = state.bucket_clip_norm(part.layout.numel)
            table, _ = clip_and_sum(private_tables(state, part), clip)
            tables.append(state.add_noise(table, std).reshape(-1))
        return torch.cat(tables)

    table = context.build((sum(sizes),), make_table)
    context.record(table.numel(), table.numel() * 4)
    decoding, normalizer = state.config.decoding, state.normalizer

    def finish(summed: Tensor) -> Tensor:
        pieces = zip(parts, summed.split(sizes), strict=True)
        tables = [(p.bucket_state, piece.view(p.sketch.table_shape)) for p, piece in pieces]
        return torch.cat([decode_or_exact(decoding, b, t).div_(normalizer) for b, t in tables])

    return context.allreduce(table, finish)
