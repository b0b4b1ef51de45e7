"""Configuration of GEAR KV-cache compression.

GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM", arXiv:2403.05527) approximates a key or value tensor ``X`` by

    X ≈ D̂ + L + S,

a low-bit quantization ``D̂`` of the bulk of the entries, a sparse matrix ``S`` holding the
outlier entries exactly, and a low-rank matrix ``L`` fitted to the residual ``X - D̂ - S``.
Following KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv:2402.02750), keys are quantized per channel (a group runs along the tokens of one
channel) and values per token (a group runs along the channels of one token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from sketchcomm.validation import check_int

QuantMode = Literal["channel", "token"]
OutlierScope = Literal["matrix", "row"]
MetadataFormat = Literal["float16", "8bit"]

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GEARConfig:
    """Settings of GEAR compression, validated on construction.

    Attributes:
        bits: bits per quantized entry, one of 2, 3, 4, 8; ``None`` or ``"none"`` disables
            compression (the cache then behaves exactly like ``DynamicCache``).
        enabled: a switch that disables compression regardless of ``bits`` when ``False``.
        group_size: number of entries sharing one scale and one minimum (asymmetric min-max
            quantization); a multiple of 4 so that 2-bit codes pack four to a byte.
        value_group_size: group size of the values when it differs from ``group_size`` (which
            then applies to the keys only); ``None`` (default) uses ``group_size`` for both.
        key_mode: ``"channel"`` (default, KIVI) quantizes keys per channel, a group being
            ``group_size`` consecutive tokens of one channel; ``"token"`` groups along channels.
        value_mode: ``"token"`` (default, KIVI) quantizes values per token, a group being
            ``group_size`` consecutive channels of one token; ``"channel"`` groups along tokens.
        outlier_ratio: fraction ``s`` of the entries of each ``[tokens, head_dim]`` matrix kept
            exactly in the sparse part: the ``s/2`` largest and the ``s/2`` smallest entries,
            as in the GEAR reference. In ``[0, 0.5)``.
        outlier_scope: ``"matrix"`` picks the outliers among all entries of the matrix (flat
            int16 indices); ``"row"`` picks ``round(s/2 · row length)`` per side in every row of
            the quantization groups' axis: per channel (along the tokens) for a per-channel
            tensor, per token for a per-token one (uint8 positions), so that they shrink the
            range of their own group.
        rank: rank ``r`` of the low-rank term ``L`` of each ``[tokens, head_dim]`` matrix; 0 turns
            it off.
        corrected: which tensors get the low-rank and sparse parts: ``"both"``, or only the
            ``"key"`` or the ``"value"`` tensors (the others are quantized only). On SmolLM2 the
            keys carry most of the quantization's error (docs/gear.md).
        power_iters: number of power-iteration loops used to fit ``L``.
        buffer_size: number ``n_b`` of most recent tokens kept in full precision by the cache; the
            buffer is compressed in blocks of ``n_b`` tokens once it holds ``n_b`` tokens (the
            streaming strategy of GEAR). With ``key_mode="channel"`` it must be a multiple of
            ``group_size``.
        seed: seed of the random start of the power iteration (compression is deterministic).
        decoded_buffer: keep the compressed blocks also decompressed, in the model's dtype, each
            block decompressed once when it is compressed; decoding steps then copy them instead
            of decompressing the whole cache. Faster steps for the memory of an uncompressed
            cache on top (counted in ``nbytes``); off by default.
        metadata: ``"8bit"`` (default) stores a uint8 code for every group's step and one for
            its minimum (16 bits per group, plus three float16 numbers per block matrix), see
            [`sketchcomm.gear.quantization`][sketchcomm.gear.quantization]; ``"float16"`` stores
            both in float16 (32 bits per group, the former default).

    >>> from sketchcomm.gear import GEARConfig
    >>> GEARConfig().describe()  # the default: rank 1 on the keys, key groups of 32 tokens
    'GEAR 4-bit g32/64 r1 s0% nb32 keys'
    >>> config = GEARConfig(bits=2, rank=4, outlier_ratio=0.02, corrected="both")
    >>> config.describe()
    'GEAR 2-bit g32/64 r4 s2% nb32'
    >>> config.quantization_only().describe()  # the same quantization, no low rank, no outliers
    'quant-only 2-bit g32/64 r0 s0% nb32'
    """

    bits: int | None = 4
    enabled: bool = True
    group_size: int = 32
    value_group_size: int | None = 64
    key_mode: QuantMode = "channel"
    value_mode: QuantMode = "token"
    outlier_ratio: float = 0.0
    outlier_scope: OutlierScope = "matrix"
    rank: int = 1
    corrected: Literal["both", "key", "value"] = "key"
    power_iters: int = 3
    buffer_size: int = 32
    seed: int = 0
    decoded_buffer: bool = False
    metadata: MetadataFormat = "8bit"

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, str):
            if bits.strip().lower() != "none":
                raise ValueError(
                    f"bits must be one of {SUPPORTED_BITS} or None/'none', got {bits!r}"
                )
            object.__setattr__(self, "bits", None)
        elif bits is not None and (isinstance(bits, bool) or bits not in SUPPORTED_BITS):
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} or None/'none', got {bits!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        for name in ("group_size", "value_group_size"):
            value = getattr(self, name)
            if name == "value_group_size" and value is None:
                continue
            check_int(name, value, minimum=4)
            if value % 4:
                raise ValueError(f"{name} must be a multiple of 4, got {value}")
        for name in ("key_mode", "value_mode"):
            if getattr(self, name) not in ("channel", "token"):
                raise ValueError(
                    f"{name} must be 'channel' or 'token', got {getattr(self, name)!r}"
                )
        ratio = self.outlier_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 0.5:
            raise ValueError(f"outlier_ratio must be a number in [0, 0.5), got {ratio!r}")
        if self.outlier_scope not in ("matrix", "row"):
            raise ValueError(f"outlier_scope must be 'matrix' or 'row', got {self.outlier_scope!r}")
        if self.corrected not in ("both", "key", "value"):
            raise ValueError(f"corrected must be 'both', 'key' or 'value', got {self.corrected!r}")
        check_int("rank", self.rank, minimum=0)
        check_int("power_iters", self.power_iters, minimum=1)
        check_int("buffer_size", self.buffer_size, minimum=1)
        check_int("seed", self.seed, minimum=0)
        if self.metadata not in ("float16", "8bit"):
            raise ValueError(f"metadata must be 'float16' or '8bit', got {self.metadata!r}")
        if not isinstance(self.decoded_buffer, bool):
            raise ValueError(f"decoded_buffer must be a bool, got {self.decoded_buffer!r}")
        for kind in ("key", "value"):
            group = self.group_size_for(kind)
            if self.compresses and self.mode_for(kind) == "channel" and self.buffer_size % group:
                raise ValueError(
                    f"buffer_size ({self.buffer_size}) must be a multiple of the {kind} group size "
                    f"({group}) when the {kind}s are quantized per channel"
                )

    @property
    def compresses(self) -> bool:
        """Whether this configuration compresses at all (``enabled`` and ``bits`` set)."""
        return self.enabled and self.bits is not None

    def mode_for(self, kind: Literal["key", "value"]) -> QuantMode:
        """The quantization mode used for keys or for values."""
        if kind == "key":
            return self.key_mode
        if kind == "value":
            return self.value_mode
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")

    def group_size_for(self, kind: Literal["key", "value"]) -> int:
        """The group size used for keys or for values."""
        if kind == "value" and self.value_group_size is not None:
            return self.value_group_size
        return self.group_size

    def quantization_only(self) -> GEARConfig:
        """The same quantization without the low-rank and sparse parts (a KIVI-like baseline)."""
        return dataclasses.replace(self, rank=0, outlier_ratio=0.0)

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``GEAR 4-bit g32/64 r1 s0% nb32 keys``."""
        if not self.compresses:
            return "uncompressed"
        name = "GEAR" if self.rank or self.outlier_ratio else "quant-only"
        return (
            f"{name} {self.bits}-bit g{self.group_size}"
            f"{'' if self.value_group_size is None else f'/{self.value_group_size}'} r{self.rank} "
            f"s{100 * self.outlier_ratio:g}%{'/row' if self.outlier_scope == 'row' else ''} "
            f"nb{self.buffer_size}{' m16' if self.metadata == 'float16' else ''}"
            f"{f' {self.corrected}s' if name == 'GEAR' and self.corrected != 'both' else ''}"
        )
