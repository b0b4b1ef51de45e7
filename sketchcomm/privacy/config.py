r"""The frozen mechanism of the private hook (:class:`PrivacyConfig`) and its threat model.

``colluding_ranks`` is ``t``, the number of ranks that may pool their own noise shares against
the other ranks' data; it is resolved with the world size when the state is registered
(:func:`~sketchcomm.privacy.mechanism.resolve_colluding_ranks`: 0 for ``unit="example"``,
``W - 1`` for ``unit="rank"`` unless given) and checked against the noise placement
(:func:`~sketchcomm.privacy.mechanism.check_threat_model`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sketchcomm.privacy.mechanism import (
    NOISE_PLACEMENTS,
    check_threat_model,
    resolve_colluding_ranks,
)
from sketchcomm.validation import check_choice, check_float

__all__ = ["UNITS", "PrivacyConfig"]

UNITS = ("example", "rank")


@dataclass(frozen=True)
class PrivacyConfig:
    """The mechanism of :func:`~sketchcomm.privacy.hook.dp_sketch_hook`, validated and frozen
    (see :class:`~sketchcomm.privacy.hook.DPSketchState` for what each field means;
    ``noise_multiplier`` is already calibrated; ``colluding_ranks`` is ``None`` until
    :meth:`resolved` with the world size).

    >>> config = PrivacyConfig(max_grad_norm=1.0, unit="rank", sample_rate=1.0,
    ...                        dataset_size=None, noise_multiplier=0.8)
    >>> config.noise_placement, config.resolved(world=3).colluding_ranks
    ('distributed', 2)
    """

    max_grad_norm: float
    unit: str
    sample_rate: float
    dataset_size: int | None
    noise_multiplier: float
    noise_placement: str = "distributed"
    secure_mode: bool = False
    colluding_ranks: int | None = None

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
        t = self.colluding_ranks
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ValueError(
                f"colluding_ranks must be None or an integer >= 0, got {t!r}: pass the number "
                "of ranks that may pool their noise shares, or None for the unit's default"
            )
        for name in ("max_grad_norm", "sample_rate", "noise_multiplier"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def resolved(self, world: int) -> PrivacyConfig:
        """This configuration with ``colluding_ranks`` resolved for ``world`` ranks and the
        noise placement checked against it (``ValueError`` naming the remedy otherwise)."""
        t = resolve_colluding_ranks(self.colluding_ranks, self.unit, world)
        check_threat_model(self.unit, self.noise_placement, t, world)
        return dataclasses.replace(self, colluding_ranks=t)

    def agreement_fields(self) -> dict[str, float]:
        """The mechanism as numbers, for the cross-rank agreement check."""
        t = self.colluding_ranks
        return {
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "unit": float(UNITS.index(self.unit)),
            "noise_placement": float(NOISE_PLACEMENTS.index(self.noise_placement)),
            "secure_mode": float(self.secure_mode),
            "colluding_ranks": -1.0 if t is None else float(t),
        }
