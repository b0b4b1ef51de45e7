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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sketchcomm.validation import check_int

QuantMode = Literal["channel", "token"]
OutlierScope = Literal["matrix", "row"]
MetadataFormat = Literal["float16", "8bit"]

SUPPORTED_BITS = (2, 3, 4, 8)

LAYER_FIELDS = (
    "bits",
    "key_bits",
    "group_size",
    "value_group_size",
    "key_mode",
    "value_mode",
    "outlier_ratio",
    "outlier_scope",
    "rank",
    "corrected",
    "power_iters",
    "metadata",
)
"""The fields a ``per_layer`` override may set (everything but the streaming and cache ones)."""


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
        key_bits: bits of the keys when they differ from ``bits`` (which then applies to the
            values only); ``None`` (default) uses ``bits`` for both.
        key_rope: ``"pre"`` undoes the model's rotary position embedding before compressing
            the keys and redoes it when reading them (KVQuant's pre-RoPE keys, see
            [`sketchcomm.gear.rope`][sketchcomm.gear.rope]), which needs the model's config in
            ``GEARCache``; ``"post"`` compresses the keys as the model caches them, after RoPE;
            ``"auto"`` (default) is ``"pre"`` when ``GEARCache`` is given a model config with a
            RoPE it supports, else ``"post"``. The same for every layer.
        per_layer: overrides for some attention layers, ``{layer index: {field: value}}``
            with fields from :data:`LAYER_FIELDS`, e.g. ``{12: {"key_bits": 4, "rank": 1}}``;
            layer ``i`` is compressed with :meth:`for_layer` ``(i)``. Stored as a sorted tuple
            of ``(layer, ((field, value), ...))`` pairs so that the config stays hashable.

    >>> from sketchcomm.gear import GEARConfig
    >>> GEARConfig().describe()  # the default: rank 1 on the keys, key groups of 32 tokens
    'GEAR 4-bit g32/64 r1 s0% nb32 keys'
    >>> config = GEARConfig(bits=2, rank=4, outlier_ratio=0.02, corrected="both")
    >>> config.describe()
    'GEAR 2-bit g32/64 r4 s2% nb32'
    >>> config.quantization_only().describe()  # the same quantization, no low rank, no outliers
    'quant-only 2-bit g32/64 r0 s0% nb32'
    >>> layered = GEARConfig(bits=2, rank=0, per_layer={5: {"key_bits": 4, "rank": 1}})
    >>> layered.describe()  # 2-bit keys and values, 4-bit keys with rank 1 on layer 5
    'GEAR 2-bit g32/64 r0 s0% nb32 keys | L5: k4 r1'
    >>> layered.for_layer(5).describe(), layered.for_layer(6).describe()
    ('GEAR 2-bit k4 g32/64 r1 s0% nb32 keys', 'quant-only 2-bit g32/64 r0 s0% nb32')
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
    key_bits: int | None = None
    key_rope: Literal["auto", "post", "pre"] = "auto"
    per_layer: Any = ()

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
        if self.key_rope not in ("auto", "post", "pre"):
            raise ValueError(f"key_rope must be 'auto', 'post' or 'pre', got {self.key_rope!r}")
        key_bits = self.key_bits
        if key_bits is not None and (isinstance(key_bits, bool) or key_bits not in SUPPORTED_BITS):
            raise ValueError(f"key_bits must be one of {SUPPORTED_BITS} or None, got {key_bits!r}")
        object.__setattr__(self, "per_layer", self._normalised_overrides())
        for kind in ("key", "value"):
            group = self.group_size_for(kind)
            if self.compresses and self.mode_for(kind) == "channel" and self.buffer_size % group:
                raise ValueError(
                    f"buffer_size ({self.buffer_size}) must be a multiple of the {kind} group size "
                    f"({group}) when the {kind}s are quantized per channel"
                )

    def _normalised_overrides(self) -> tuple:
        """``per_layer`` as a sorted tuple of ``(layer, ((field, value), ...))``, validated."""
        overrides = self.per_layer
        if isinstance(overrides, Mapping):
            overrides = tuple(overrides.items())
        if not isinstance(overrides, tuple | list):
            raise ValueError(
                "per_layer must map layer indices to {field: value} overrides, "
                f"got {type(overrides).__name__}"
            )
        normalised = {}
        for entry in overrides:
            if not (isinstance(entry, tuple | list) and len(entry) == 2):
                raise ValueError(f"per_layer entries must be (layer, overrides), got {entry!r}")
            layer, fields = entry
            check_int("per_layer layer index", layer, minimum=0)
            fields = dict(fields.items() if isinstance(fields, Mapping) else fields)
            unknown = sorted(set(fields) - set(LAYER_FIELDS))
            if unknown:
                raise ValueError(
                    f"per_layer[{layer}] cannot set {unknown}; allowed fields: {LAYER_FIELDS}"
                )
            if layer in normalised:
                raise ValueError(f"per_layer names layer {layer} twice")
            if fields:
                normalised[layer] = tuple(sorted(fields.items()))
        if normalised and not self.compresses:
            raise ValueError("per_layer needs a config that compresses (bits set, enabled)")
        result = tuple(sorted(normalised.items()))
        for layer, fields in result:
            try:
                layer_config = dataclasses.replace(self, per_layer=(), **dict(fields))
            except ValueError as error:
                raise ValueError(f"per_layer[{layer}]: {error}") from error
            if not layer_config.compresses:
                raise ValueError(f"per_layer[{layer}] must compress (bits cannot be None)")
        return result

    def for_layer(self, layer: int) -> GEARConfig:
        """The config of attention layer ``layer``: this one with its ``per_layer`` override."""
        for index, fields in self.per_layer:
            if index == layer:
                return dataclasses.replace(self, per_layer=(), **dict(fields))
        return dataclasses.replace(self, per_layer=()) if self.per_layer else self

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

    def bits_for(self, kind: Literal["key", "value"]) -> int | None:
        """The bits of keys or of values."""
        if kind == "key" and self.key_bits is not None:
            return self.key_bits
        self.mode_for(kind)  # validates kind
        return self.bits

    def quantization_only(self) -> GEARConfig:
        """The same quantization without the low-rank and sparse parts (a KIVI-like baseline),
        on every layer."""
        overrides = tuple(
            (layer, tuple(f for f in fields if f[0] not in ("rank", "outlier_ratio")))
            for layer, fields in self.per_layer
        )
        return dataclasses.replace(self, rank=0, outlier_ratio=0.0, per_layer=overrides)

    @property
    def corrects(self) -> bool:
        """Whether some layer has a low-rank or sparse term."""
        configs = [self] + [self.for_layer(layer) for layer, _ in self.per_layer]
        return any(c.rank or c.outlier_ratio for c in configs)

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``GEAR 4-bit g32/64 r1 s0% nb32 keys``."""
        if not self.compresses:
            return "uncompressed"
        name = "GEAR" if self.corrects else "quant-only"
        key_bits = "" if self.key_bits is None else f" k{self.key_bits}"
        return (
            f"{name} {self.bits}-bit{key_bits} g{self.group_size}"
            f"{'' if self.value_group_size is None else f'/{self.value_group_size}'} r{self.rank} "
            f"s{100 * self.outlier_ratio:g}%{'/row' if self.outlier_scope == 'row' else ''} "
            f"nb{self.buffer_size}{' m16' if self.metadata == 'float16' else ''}"
            f"{'' if self.key_rope == 'auto' else f' {self.key_rope}RoPE'}"
            f"{f' {self.corrected}s' if name == 'GEAR' and self.corrected != 'both' else ''}"
            f"{describe_overrides(self.per_layer)}"
        )


SHORT_NAMES = {
    "bits": "b",
    "key_bits": "k",
    "rank": "r",
    "group_size": "g",
    "value_group_size": "gv",
}


def describe_overrides(per_layer: tuple) -> str:
    """``" | L12-14,20: k4 r1 | L3: k3"``: layers with equal overrides, listed together."""
    if not per_layer:
        return ""
    groups: dict[tuple, list[int]] = {}
    for layer, fields in per_layer:
        groups.setdefault(fields, []).append(layer)
    parts = []
    for fields, layers in groups.items():
        spans, start = [], layers[0]
        for previous, current in zip(layers, [*layers[1:], None], strict=True):
            if current != previous + 1:
                spans.append(f"{start}" if start == previous else f"{start}-{previous}")
                start = current
        settings = " ".join(f"{SHORT_NAMES.get(k, k + '=')}{v}" for k, v in fields)
        parts.append(f" | L{','.join(spans)}: {settings}")
    return "".join(parts)
