"""The configuration of a sketched hook, validated once and frozen: what every rank and every
checkpoint must agree on. Runtime state (iteration, statistics, per-bucket tensors) lives in
[`SketchState`][sketchcomm.SketchState]."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sketchcomm.recovery import DecodeConfig
from sketchcomm.sketch import prime_at_most
from sketchcomm.validation import check_choice, check_float, check_int

__all__ = ["SketchConfig"]

RECOVERY = ("topk", "dense")
ERROR_FEEDBACK = ("local", "sketch", "none")
NONFINITE = ("propagate", "raise")
DEFAULT_ROWS = {"topk": 3, "dense": 1}
#: Numeric codes of the string options, for the cross-rank agreement check.
OPTION_CODES = {"topk": 0, "dense": 1, "local": 0, "sketch": 1, "none": 2}


@dataclass(frozen=True)
class SketchConfig:
    """Options of [`sketch_hook()`][sketchcomm.sketch_hook]; see
    [`SketchState`][sketchcomm.SketchState] for what each means. ``rows=None`` and
    ``error_feedback=None`` resolve to their defaults, so two configs compare equal when they sketch
    alike. ``exact_small_buckets`` sends buckets that are not worth compressing as an exact one-row
    table instead of a plain allreduce (the private hook privatises every bucket).

    >>> config = SketchConfig(compression=20, recovery="dense")
    >>> config.rows, config.error_feedback, config.table_shape_for(100_000)
    (1, 'none', (1, 4999))
    >>> config.table_shape_for(1000) is None  # below min_compression_size: plain allreduce
    True
    """

    compression: float = 20.0
    rows: int | None = None
    columns: int | None = None
    recovery: str = "topk"
    topk_fraction: float = 0.01
    second_round: bool = False
    candidates: float = 2.0
    error_feedback: str | None = None
    momentum: float = 0.0
    start_iter: int = 2
    min_compression_size: int = 16384
    seed: int = 0
    nonfinite: str = "propagate"
    exact_small_buckets: bool = False

    def __post_init__(self) -> None:
        check_float("compression", self.compression, 1.0, math.inf, open_low=True)
        check_choice("recovery", self.recovery, RECOVERY)
        rows = DEFAULT_ROWS[self.recovery] if self.rows is None else self.rows
        check_int("rows", rows, 1)
        if self.columns is not None:
            check_int("columns", self.columns, 1)
        check_float("topk_fraction", self.topk_fraction, 0.0, 1.0, open_low=True)
        for name in ("second_round", "exact_small_buckets"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_float("candidates", self.candidates, 1.0, math.inf, open_low=False)
        feedback = self.error_feedback
        if feedback is None:
            feedback = (
                "none" if self.recovery == "dense" else "local" if self.second_round else "sketch"
            )
        check_choice("error_feedback", feedback, ERROR_FEEDBACK)
        self._check_combination(feedback)
        check_int("start_iter", self.start_iter, 0)
        check_int("min_compression_size", self.min_compression_size, 1)
        check_int("seed", self.seed, 0)
        check_choice("nonfinite", self.nonfinite, NONFINITE)
        # Frozen: the resolved defaults and canonical number types are set once, here.
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "error_feedback", feedback)
        for name in ("compression", "topk_fraction", "candidates", "momentum"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _check_combination(self, feedback: str) -> None:
        if self.recovery == "dense" and feedback != "none":
            raise ValueError(
                "error_feedback must be 'none' with recovery='dense' (it would diverge)"
            )
        if feedback == "local" and not self.second_round:
            raise ValueError("error_feedback='local' needs second_round=True (it would diverge)")
        check_float("momentum", self.momentum, 0.0, 1.0, open_low=False)
        if self.momentum == 1.0:
            raise ValueError("momentum must be below 1")
        if self.momentum and feedback != "sketch":
            raise ValueError("momentum is kept in sketch space: it needs error_feedback='sketch'")
        if self.second_round and self.recovery != "topk":
            raise ValueError("second_round needs recovery='topk'")
        if self.second_round and feedback == "sketch":
            raise ValueError(
                "second_round is incompatible with error_feedback='sketch': exact values of the "
                "current gradients do not match the accumulated sketch"
            )

    @property
    def decoding(self) -> DecodeConfig:
        """What [`decode()`][sketchcomm.recovery.decode] needs."""
        return DecodeConfig(self.recovery, self.error_feedback, self.momentum)

    def table_shape_for(self, numel: int) -> tuple[int, int] | None:
        """``(rows, columns)`` of the table of a bucket of ``numel`` elements, or None if the
        bucket is allreduced uncompressed. Columns are the largest prime at most
        ``numel / (compression * rows)`` and at least ``sqrt(numel)`` (see
        [`sketchcomm.sketch`][sketchcomm.sketch])."""
        if self.columns is not None:
            return (self.rows, self.columns)
        target = int(numel / (self.compression * self.rows))
        if numel < self.min_compression_size or target < 2 or target * target < numel:
            return (1, numel) if self.exact_small_buckets else None
        return (self.rows, prime_at_most(target))

    def kept_coordinates(self, numel: int) -> tuple[int, int]:
        """``topk = ceil(topk_fraction * d)`` kept coordinates and ``min(d, ceil(candidates *
        topk))`` second-round candidates of a bucket of ``d = numel`` elements."""
        topk = max(1, math.ceil(self.topk_fraction * numel))
        return topk, min(numel, math.ceil(self.candidates * topk))

    def agreement_fields(self) -> dict[str, float]:
        """The options as numbers, for the cross-rank agreement check."""
        return {
            "rows": self.rows,
            "seed": self.seed,
            "recovery": OPTION_CODES[self.recovery],
            "second_round": float(self.second_round),
            "error_feedback": OPTION_CODES[self.error_feedback],
            "momentum": self.momentum,
        }

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (what a checkpoint stores)."""
        return asdict(self)
