r"""Separate-noise baselines: Gaussian noise in gradient space first, compression second.

These DDP communication hooks release the same Gaussian mechanism as DP-SGD and then compress the
*noised* gradient, the order that the private sketch (:func:`~sketchcomm.privacy.dp_sketch_hook`)
reverses. For every bucket ``b`` of ``d_b`` elements, rank ``w`` computes

.. math::

    \tilde g_w = \sum_{i \in B_w} g_i \min\Big(1, \frac{C_b}{\|g_i\|_2}\Big) + z_w,
    \qquad C_b = C \sqrt{d_b / D},

from the per-example gradients ``g_i`` of its Poisson-sampled examples ``B_w`` (clipped in
gradient space, with the per-bucket thresholds of :mod:`sketchcomm.privacy.mechanism`) and its
noise ``z_w``. By default ``z_w ~ N(0, \sigma^2 C^2 / W)`` per coordinate, so that
``\sum_w \tilde g_w`` carries ``N(0, \sigma^2 C^2)`` once, the same release as DP-SGD with noise
multiplier ``\sigma``, recorded in the same :class:`~sketchcomm.privacy.PrivacyLedger`. What each
compressor then sends, at the byte budget of the private sketch's ``r x c`` fp32 table, is:

``"sketch"``
    ``S(\tilde g_w)``, the Count Sketch of the noised gradient (the same ``r x c`` table); the
    summed table is recovered with FetchSGD top-k and sketch-space momentum and error
    (:func:`~sketchcomm.recovery.decode`). The summed table is ``S(\sum_w \tilde g_w)``, so the
    release is post-processing of the DP-SGD sum. Each cell now holds about ``d_b / c`` noise
    coordinates, where the private sketch adds one noise draw per cell.
``"topk"``
    the ``k = \lfloor r c / 2 \rfloor`` largest coordinates of ``e_w`` (fp32 values and int32
    indices: ``8 k <= 4 r c`` bytes), gathered from every rank, with local momentum and error
    feedback on the noised gradient: ``u_w <- \rho u_w + \tilde g_w``, ``e_w <- e_w + u_w``, send
    ``Top_k(e_w)`` and zero those coordinates of ``e_w`` and ``u_w``. Every rank's message is seen
    by the others, so a message with only its ``1/W`` share of the noise is DP with noise
    multiplier ``\sigma / \sqrt W`` towards whoever sees it; ``per_message_noise=True`` gives every
    rank the full ``N(0, \sigma^2 C^2)``, for the stated ``\sigma`` against that observer, at ``W``
    times the noise variance in the aggregate.
``"randk"``
    the values of ``\tilde g_w`` at ``k = r c`` coordinates drawn uniformly without replacement
    from a generator seeded by ``(seed, bucket, step)``, the same on every rank (no indices are
    sent), allreduced and scaled by ``d_b / k``, an unbiased estimate of ``\sum_w \tilde g_w``.
    Only the released ``k`` values are noised (the others are never released).

Every result is divided by the expected batch ``q N``, as in the private sketch. The privacy of
every baseline comes from the noise and the clipping; compression adds none.
"""

# No "from __future__ import annotations": DDP checks the hook's ``bucket`` annotation at runtime.

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sketchcomm.buckets import BucketState
from sketchcomm.engine import BucketContext
from sketchcomm.privacy.hook import DPSketchState
from sketchcomm.privacy.ledger import PrivacyLedger
from sketchcomm.privacy.mechanism import clip_and_sum
from sketchcomm.recovery import decode_or_exact
from sketchcomm.sketch import derive_seed

__all__ = [
    "COMPRESSORS",
    "SeparateNoiseState",
    "noised_randk_hook",
    "noised_sketch_hook",
    "noised_topk_hook",
    "random_coordinates",
]


@dataclass
class LocalFeedback:
    """A rank's own top-k state for one bucket (canonical order): error ``e`` and momentum ``u``
    of its noised gradients.

    >>> LocalFeedback(torch.zeros(3), None).error.tolist()
    [0.0, 0.0, 0.0]
    """

    error: Tensor
    momentum: Tensor | None


class SeparateNoiseState(DPSketchState):
    r"""State of the separate-noise hooks: a :class:`~sketchcomm.privacy.DPSketchState` (ledger,
    calibration, clipping norm, per-example capture, bucket tables) plus a compressor.

    Args:
        ledger: the privacy ledger, built identically on every rank.
        max_grad_norm: clipping norm ``C`` of one example's gradient over all buckets.
        compressor: ``"sketch"``, ``"topk"`` or ``"randk"`` (see the module docstring).
        per_message_noise: every rank adds ``N(0, \sigma^2 C^2)`` instead of its ``1/W`` share.
        **options: the arguments of :class:`~sketchcomm.privacy.DPSketchState` (``sample_rate``,
            ``dataset_size``, ``noise_multiplier`` or ``target_epsilon`` with ``steps``, and the
            sketch options that fix the table size: ``compression``, ``rows``,
            ``min_compression_size``, ``seed``; ``topk_fraction`` and ``momentum`` for the
            ``"sketch"`` recovery, ``momentum`` for the local top-k feedback). ``unit`` must be
            ``"example"``. ``momentum`` must be 0 for ``"randk"``: its estimate is unbiased, so
            momentum belongs in the optimizer.

    >>> from sketchcomm.privacy import PrivacyLedger
    >>> state = SeparateNoiseState(PrivacyLedger("rdp", 1e-5), 1.0, "randk", sample_rate=0.01,
    ...                            dataset_size=1000, noise_multiplier=1.0)
    >>> state.compressor, state.noise_std(rank=0, world=4)
    ('randk', 0.5)
    """

    def __init__(
        self,
        ledger: PrivacyLedger,
        max_grad_norm: float,
        compressor: str,
        per_message_noise: bool = False,
        **options: Any,
    ) -> None:
        if compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {tuple(COMPRESSORS)}, got {compressor!r}")
        if options.get("unit", "example") != "example":
            raise ValueError("the separate-noise baselines clip per example: unit='example' only")
        if compressor == "randk" and options.get("momentum", 0.0):
            raise ValueError("momentum must be 0 for 'randk' (use the optimizer's momentum)")
        if options.get("noise_placement", "distributed") != "distributed":
            raise ValueError("the separate-noise baselines split the noise over the ranks")
        if not isinstance(per_message_noise, bool):
            raise ValueError(f"per_message_noise must be a bool, got {per_message_noise!r}")
        super().__init__(ledger, max_grad_norm, **options)
        self.compressor = compressor
        self.per_message_noise = per_message_noise
        self.local: dict[tuple, LocalFeedback] = {}

    def register(self, ddp_model: nn.Module, hook: Any = None) -> None:
        """Bind the parameters, install per-example capture and register the compressor's hook."""
        super().register(ddp_model, COMPRESSORS[self.compressor] if hook is None else hook)

    def noise_std(self, rank: int, world: int) -> float:
        r"""``\sigma C`` with per-message noise, else this rank's share ``\sigma C / \sqrt W``."""
        if self.per_message_noise:
            return self.noise_multiplier * self.max_grad_norm
        return super().noise_std(rank, world)

    def message_elements(self, bucket_state: BucketState) -> int:
        """The 4-byte words of the private sketch's table for this bucket: the byte budget."""
        return bucket_state.sketch.rows * bucket_state.sketch.columns

    def agreement_fields(self, bucket: BucketState) -> dict[str, float]:
        return {
            **super().agreement_fields(bucket),
            "compressor": float(tuple(COMPRESSORS).index(self.compressor)),
            "per_message_noise": float(self.per_message_noise),
        }

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            **super().checkpoint_config(),
            "compressor": self.compressor,
            "per_message_noise": self.per_message_noise,
        }

    def feedback(self, key: tuple, numel: int, device: torch.device) -> LocalFeedback:
        """This rank's top-k error and momentum for the bucket with layout ``key``."""
        local = self.local.get(key)
        if local is None:
            zeros = torch.zeros(numel, dtype=torch.float32, device=device)
            local = LocalFeedback(zeros, zeros.clone() if self.config.momentum else None)
            self.local[key] = local
        return local

    def state_dict(self) -> dict[str, Any]:
        """:meth:`DPSketchState.state_dict` plus the local top-k error and momentum."""
        local = {key: (f.error, f.momentum) for key, f in self.local.items()}
        return {**super().state_dict(), "local": local}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.local = {
            tuple(key): LocalFeedback(error, momentum)
            for key, (error, momentum) in state_dict["local"].items()
        }


def random_coordinates(seed: int, key: tuple, step: int, dim: int, k: int) -> Tensor:
    """``k`` of ``range(dim)`` uniformly without replacement, a function of ``(seed, key, step)``
    only, so every rank draws the same ones (int64, ``[k]``)."""
    generator = torch.Generator().manual_seed(derive_seed("randk", seed, key, step))
    return torch.randperm(dim, generator=generator)[:k]


def _noised_hook(
    state: SeparateNoiseState,
    bucket: dist.GradBucket,
    numel: Callable[[BucketContext], int],
    compress: Callable[[BucketContext, Tensor, float], Tensor],
) -> tuple[BucketContext, Tensor]:
    """Open the bucket and build this rank's message: record the step in the ledger at its first
    bucket (DDP launches buckets in index order), clip this rank's per-example gradients of the
    bucket to ``C_b``, sum them, and ``compress(context, clipped, noise_std)`` the sum."""
    if state.positions is None:
        raise RuntimeError("register the state with state.register(ddp_model), not directly")
    context = state.open(bucket)

    def make() -> Tensor:
        if bucket.index() == 0:
            state.open_step(context.buffer.device)
        clip = state.bucket_clip_norm(context.layout.numel)
        clipped, _ = clip_and_sum(state.contributions.rows(context)[:, None, :], clip)
        return compress(context, clipped[0], state.noise_std(context.rank, context.world))

    message = context.build((numel(context),), make)
    context.record(message.numel(), message.numel() * 4)
    return context, message


def noised_sketch_hook(
    state: SeparateNoiseState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    r"""Noise in gradient space, then the Count Sketch: allreduce ``S(\tilde g_w)`` and recover
    ``\sum_w \tilde g_w`` with the private sketch's decoder (FetchSGD top-k with sketch-space
    momentum and error; exact for a one-row table), divided by ``q N``."""

    def compress(context: BucketContext, clipped: Tensor, std: float) -> Tensor:
        return context.sketch.sketch(state.add_noise(clipped, std)).flatten()

    context, message = _noised_hook(
        state, bucket, lambda c: c.sketch.rows * c.sketch.columns, compress
    )
    decoding, bucket_state, normalizer = (
        state.config.decoding,
        context.bucket_state,
        state.normalizer,
    )
    shape = context.sketch.table_shape
    return context.allreduce(
        message,
        lambda summed: decode_or_exact(decoding, bucket_state, summed.view(shape)).div_(normalizer),
        check_finite=False,
    )


def noised_topk_hook(
    state: SeparateNoiseState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    r"""Noise in gradient space, then local top-k with momentum and error feedback: every rank
    sends its ``k = \lfloor r c / 2 \rfloor`` largest coordinates of ``e_w`` (values and int32
    indices in one fp32 message), the messages are allgathered and summed, divided by ``q N``."""

    def kept(context: BucketContext) -> int:
        return min(context.layout.numel, max(1, state.message_elements(context.bucket_state) // 2))

    def compress(context: BucketContext, clipped: Tensor, std: float) -> Tensor:
        k = kept(context)
        local = state.feedback(context.layout.key, context.layout.numel, clipped.device)
        noised = state.add_noise(clipped, std)
        if local.momentum is not None:
            local.momentum.mul_(state.config.momentum).add_(noised)
            local.error.add_(local.momentum)
        else:
            local.error.add_(noised)
        indices = local.error.abs().topk(k, sorted=False).indices
        message = torch.cat((local.error[indices], indices.to(torch.int32).view(torch.float32)))
        local.error[indices] = 0.0
        if local.momentum is not None:
            local.momentum[indices] = 0.0
        return message

    context, message = _noised_hook(state, bucket, lambda c: 2 * kept(c), compress)
    k, numel, normalizer = kept(context), context.layout.numel, state.normalizer

    def decode(messages: list[Tensor]) -> Tensor:
        update = torch.zeros(numel, dtype=torch.float32, device=context.buffer.device)
        for received in messages:
            update.index_add_(0, received[k:].view(torch.int32).long(), received[:k])
        return update.div_(normalizer)

    return context.allgather(message, decode)


def noised_randk_hook(
    state: SeparateNoiseState, bucket: dist.GradBucket
) -> torch.futures.Future[Tensor]:
    r"""Noise in gradient space at ``k = r c`` shared random coordinates: allreduce the noised
    values and return ``(d_b / k) \sum_w \tilde g_w`` there (zero elsewhere), divided by ``q N``."""

    def kept(context: BucketContext) -> int:
        return min(context.layout.numel, state.message_elements(context.bucket_state))

    drawn: dict[str, Tensor] = {}

    def coordinates(context: BucketContext) -> Tensor:
        if "chosen" not in drawn:  # the same draw on every rank, failed or not
            layout = context.layout
            drawn["chosen"] = random_coordinates(
                state.config.seed, layout.key, iteration, layout.numel, kept(context)
            )
        return drawn["chosen"]

    def compress(context: BucketContext, clipped: Tensor, std: float) -> Tensor:
        return state.add_noise(clipped[coordinates(context).to(clipped.device)], std)

    iteration = state.iter
    context, message = _noised_hook(state, bucket, kept, compress)
    numel, device = context.layout.numel, context.buffer.device
    chosen = coordinates(context)
    scale = numel / (kept(context) * state.normalizer)

    def decode(summed: Tensor) -> Tensor:
        update = torch.zeros(numel, dtype=torch.float32, device=device)
        update[chosen.to(device)] = summed * scale
        return update

    return context.allreduce(message, decode, check_finite=False)


#: The hook of each compressor.
COMPRESSORS: dict[str, Callable[[SeparateNoiseState, dist.GradBucket], torch.futures.Future]] = {
    "sketch": noised_sketch_hook,
    "topk": noised_topk_hook,
    "randk": noised_randk_hook,
}
