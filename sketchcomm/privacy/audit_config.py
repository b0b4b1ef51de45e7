r"""Configuration of an empirical privacy audit
([`sketchcomm.privacy.audit`][sketchcomm.privacy.audit]): the variant, the fault, the mechanism's
parameters, and what follows from them before any trial runs: the claimed epsilon and the score's
predicted shift and spread.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from sketchcomm.privacy import ACCOUNTANTS, PrivacyLedger
from sketchcomm.privacy.audit_faults import FAULTS, noise_factor
from sketchcomm.privacy.audit_variants import VARIANTS
from sketchcomm.validation import check_choice, check_float, check_int

__all__ = ["AuditConfig", "audit_ledger", "claimed_epsilon", "predicted_score"]


@dataclass(frozen=True)
class AuditConfig:
    """One audit.

    Attributes:
        variant: the model, data, canary and unit, one of
            [`VARIANTS`][sketchcomm.privacy.audit_variants.VARIANTS].
        fault: a fault planted in the hook, one of
            [`FAULTS`][sketchcomm.privacy.audit_faults.FAULTS] (``"none"``: honest).
        trials: releases in all, half of them with the canary; the first half of the trials
            chooses the threshold, the second half bounds its error rates.
        noise_multiplier: ``sigma`` of the claim.
        noise_scale: the hook is configured with ``noise_scale * sigma`` (1: honest; 0.5: half
            the noise; 0: none), the claim stays the one for ``sigma``.
        max_grad_norm: clipping norm ``C``.
        compression: bucket elements per table cell (one-row table); 1 for an exact ``[1, d]``
            table (the uncompressed path of the hook).
        delta: the claimed delta.
        accountant: Opacus accountant of the ledger: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        confidence: confidence of the lower bound, in (0, 1).
        world: number of gloo ranks (processes); each adds its share of the noise (2 or more
            for the ``rank`` variant).
        dim: number of model parameters ``d``.
        background: background examples per rank ``B``.
        tokens: tokens per example ``T`` of the ``tokens`` variant.
        buckets: parameter blocks, one DDP bucket each, of the ``buckets`` variant.
        seed: seed of the data, the canary's coordinate, the trial order and the hashes (the
            noise itself comes from the operating system, as in training).

    >>> config = AuditConfig(variant="buckets", fault="clip-split", dim=64, buckets=4)
    >>> config.block_sizes, predicted_score(config)
    ((16, 16, 16, 16), (2.0, 1.0))
    """

    variant: str = "linear"
    fault: str = "none"
    trials: int = 20_000
    noise_multiplier: float = 1.0
    noise_scale: float = 1.0
    max_grad_norm: float = 1.0
    compression: float = 20.0
    delta: float = 1e-5
    accountant: str = "prv"
    confidence: float = 0.95
    world: int = 1
    dim: int = 1024
    background: int = 7
    tokens: int = 8
    buckets: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, tuple(VARIANTS))
        check_choice("fault", self.fault, FAULTS)
        check_int("trials", self.trials, 8)
        check_float("noise_multiplier", self.noise_multiplier, 0.0, math.inf, open_low=True)
        check_float("noise_scale", self.noise_scale, 0.0, 1.0, open_low=False)
        check_float("max_grad_norm", self.max_grad_norm, 0.0, math.inf, open_low=True)
        check_float("compression", self.compression, 1.0, math.inf, open_low=False)
        check_float("delta", self.delta, 0.0, 1.0, open_low=True)
        check_choice("accountant", self.accountant, ACCOUNTANTS)
        check_float("confidence", self.confidence, 0.0, 1.0, open_low=True)
        if self.confidence == 1.0:
            raise ValueError("confidence must be below 1")
        check_int("world", self.world, 1)
        check_int("dim", self.dim, 2)
        check_int("background", self.background, 0)
        check_int("tokens", self.tokens, 1)
        check_int("buckets", self.buckets, 2)
        check_int("seed", self.seed, 0)
        if self.variant == "rank" and self.world < 2:
            raise ValueError("the rank variant needs world >= 2 (one rank is the canary)")
        if self.variant == "buckets" and (self.dim % self.buckets or self.dim < 2 * self.buckets):
            raise ValueError(
                f"the buckets variant splits dim ({self.dim}) into buckets ({self.buckets}) equal "
                "blocks of 2 or more: choose dim as a multiple of buckets"
            )
        if self.fault == "clip-split" and len(self.block_sizes) < 2:
            raise ValueError(
                "fault 'clip-split' changes nothing with one bucket (C_b = C): use "
                "variant='buckets'"
            )
        if self.delta >= 1.0 / self.dataset_size:
            raise ValueError(
                f"delta ({self.delta:g}) must be below 1/dataset size ({self.dataset_size})"
            )

    @property
    def unit(self) -> str:
        """The unit of privacy of the variant: ``"example"`` or ``"rank"``."""
        return VARIANTS[self.variant].unit

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """``d_b`` of the model's parameter blocks, one DDP bucket each."""
        return VARIANTS[self.variant].blocks(self)

    @property
    def dataset_size(self) -> int:
        """Units in the dataset: ``N = W B + 1`` examples (every rank's background examples and
        the canary), or the ``W`` ranks for ``unit="rank"``."""
        return self.world if self.unit == "rank" else self.world * self.background + 1

    @property
    def configured_noise_multiplier(self) -> float:
        """The noise multiplier the hook is configured with: ``noise_scale * sigma``."""
        return self.noise_scale * self.noise_multiplier

    @property
    def effective_noise_multiplier(self) -> float:
        """The noise the hook really adds, in units of ``C``: the configured multiplier times the
        fault's share (0 without noise, 1/2 with half of it)."""
        return self.configured_noise_multiplier * noise_factor(self.fault)


def audit_ledger(config: AuditConfig) -> PrivacyLedger:
    return PrivacyLedger(
        config.accountant,
        config.delta,
        unit=config.unit,
        dataset_size=config.dataset_size,
        colluding_ranks=0,
    )


def claimed_epsilon(config: AuditConfig) -> float:
    """Epsilon a ledger with ``config``'s accountant, delta and unit reports for one step at
    ``config.noise_multiplier`` and sample rate 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Opacus's PRV at q = 1 takes log(0)
        return audit_ledger(config).epsilon_after(config.noise_multiplier, 1.0, 1)


def predicted_score(config: AuditConfig) -> tuple[float, float]:
    r"""The score's shift with the canary and its std, in units of ``C``, for the mechanism as
    ``config`` configures and breaks it.

    Bucket ``b`` clips the canary to ``c_b`` (``C_b = C sqrt(d_b / D)``, or ``C`` under
    ``"clip-split"``) and the score weighs it by ``C_b / C``, so the shift is
    ``sum_b (C_b / C)(c_b / C)`` (1 when honest, ``sum_b sqrt(d_b / D)`` with the wrong split);
    the noise, ``N(0, sigma_eff^2 C^2)`` per cell, gives std ``sigma_eff`` as
    ``sum_b C_b^2 = C^2``.
    """
    sizes = config.block_sizes
    total = sum(sizes)
    weights = [math.sqrt(size / total) for size in sizes]
    clips = weights if config.fault != "clip-split" else [1.0] * len(sizes)
    shift = sum(w * c for w, c in zip(weights, clips, strict=True))
    return shift, config.effective_noise_multiplier
