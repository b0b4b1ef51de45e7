r"""Faults planted in the private hook on purpose, to check that the audit detects them.

A fault is an implementation error the ledger cannot see: the state records the configured
noise multiplier ``sigma`` and clipping norm ``C`` (so the ledger claims the honest epsilon),
but the hook, which asks the state for each bucket's threshold and each rank's noise, gets
wrong answers:

``"none"``
    the honest mechanism.
``"no-noise"``
    every rank adds no noise: the release is the exact clipped sum (true epsilon infinite).
``"half-noise"``
    every rank adds half its share: the summed noise has std ``sigma C / 2`` (true noise
    multiplier ``sigma / 2``).
``"clip-split"``
    every bucket is clipped to the full ``C`` instead of ``C_b = C sqrt(d_b / D)``: with ``n``
    equal buckets one contribution moves the release by up to ``sqrt(n) C``, so the true noise
    multiplier is ``sigma / sqrt(n)``.
"""

from __future__ import annotations

from typing import Any

from sketchcomm.privacy.hook import DPSketchState
from sketchcomm.validation import check_choice

__all__ = ["FAULTS", "FaultyDPSketchState", "noise_factor"]

FAULTS = ("none", "no-noise", "half-noise", "clip-split")

_NOISE_FACTORS = {"none": 1.0, "no-noise": 0.0, "half-noise": 0.5, "clip-split": 1.0}


def noise_factor(fault: str) -> float:
    """The fraction of each rank's noise share that ``fault`` adds."""
    check_choice("fault", fault, FAULTS)
    return _NOISE_FACTORS[fault]


class FaultyDPSketchState(DPSketchState):
    """[`DPSketchState`][sketchcomm.privacy.DPSketchState] whose hook adds less noise or clips
    wrongly.

    Args:
        fault: one of [`FAULTS`][sketchcomm.privacy.audit_faults.FAULTS].
        *args, **kwargs: those of [`DPSketchState`][sketchcomm.privacy.DPSketchState]; the ledger
        records
            the configured ``noise_multiplier`` whatever the fault.

    >>> from sketchcomm.privacy import PrivacyLedger
    >>> state = FaultyDPSketchState(
    ...     PrivacyLedger("rdp", 1e-5), max_grad_norm=1.0, sample_rate=1.0, dataset_size=10,
    ...     noise_multiplier=1.0, fault="no-noise")
    >>> state.noise_std(rank=0, world=2), state.noise_multiplier
    (0.0, 1.0)
    """

    def __init__(self, *args: Any, fault: str, **kwargs: Any) -> None:
        self.fault = fault
        self._noise_factor = noise_factor(fault)
        super().__init__(*args, **kwargs)

    def bucket_clip_norm(self, numel: int) -> float:
        """``C`` for every bucket under ``"clip-split"``, else ``C_b = C sqrt(d_b / D)``."""
        honest = super().bucket_clip_norm(numel)  # also checks numel against the model's size
        return self.max_grad_norm if self.fault == "clip-split" else honest

    def noise_std(self, rank: int, world: int) -> float:
        """The honest share scaled by 0 (``"no-noise"``), 0.5 (``"half-noise"``) or 1."""
        return self._noise_factor * super().noise_std(rank, world)
