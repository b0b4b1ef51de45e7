"""Group-wise asymmetric low-bit quantization with really packed codes.

A matrix ``X`` of shape ``[..., n, d]`` (``n`` tokens, ``d`` channels of one head) is cut into
groups of ``g`` consecutive entries along one axis:

* ``mode="token"``: along the channels of one token (per-token quantization, KIVI's choice for
  values), giving groups ``X[t, j*g:(j+1)*g]``;
* ``mode="channel"``: along the tokens of one channel (per-channel quantization, KIVI's choice
  for keys), giving groups ``X[j*g:(j+1)*g, c]``.

Each group ``G`` with minimum ``m = min G`` and maximum ``M = max G`` is stored as ``b``-bit codes

    q = clamp(round((x - m) / s), 0, 2^b - 1),    s = (M - m) / (2^b - 1),

and read back as ``x̂ = m + s q``, so that ``|x - x̂| <= s / 2`` (up to the float16 rounding of
``m`` and ``s``, which are stored in float16). Entries flagged in an exclusion mask (the outliers
of GEAR) are left out of ``m`` and ``M``, which shrinks the step ``s`` of their group.

Codes are packed ``8 / b`` to a ``uint8`` (four 2-bit, two 4-bit or one 8-bit code per byte; a
3-bit code is a 2-bit and a 1-bit plane) in
the ``[..., n, d]`` layout of the data in both modes, planes of tokens sharing a byte (see
[`pack_codes()`][sketchcomm.gear.quantization.pack_codes]), so that unpacking yields ``[..., n, d]``
directly, without a transpose. A grouped axis whose length is not a multiple of ``g`` is padded by
repeating its last entry, and the token axis is padded to a multiple of 4; the padding's codes are
stored (and counted) too.

**8-bit metadata** (``metadata="8bit"``): instead of a float16 step and minimum per group, each
``[n, d]`` matrix stores three float16 numbers ``(μ, δ, σ)`` and every group a uint8 minimum
code ``a`` and a uint8 step code ``c``:

    m' = μ + a δ  (a = ⌊(m - μ) / δ⌋, μ and δ the matrix's lowest minimum and span / 255),
    s' = σ 2^{c/16}  (c = ⌈16 log2(s / σ)⌉, s = (M - m') / (2^b - 1)),

both rounded so that ``m' <= m`` and ``s' >= (M - m') / (2^b - 1)``: the group's range stays
inside the ``2^b`` levels and the error stays within ``s' / 2``, with a step at most 4.4 %
(``2^{1/16}``) larger plus ``δ / (2^b - 1)``. ``σ`` is the matrix's smallest step, or
``2^{-255/16}`` of its largest when that is larger (the codes span 16 octaves). This halves the
metadata: 16 bits per group plus 48 per matrix instead of 32 per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .config import MetadataFormat, QuantMode


def rows_multiple(bits: int) -> int:
    """The row count [`pack_codes()`][sketchcomm.gear.quantization.pack_codes] needs a multiple
    of: ``8 / b`` codes share a byte, and 3-bit codes are a 2-bit and a 1-bit plane (8 rows)."""
    _check_bits(bits)
    return 8 if bits == 3 else 8 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``b``-bit codes ``[..., m, k]`` (``uint8``, below ``2^b``) into ``[..., m*b/8, k]``.

    For ``b`` in 1, 2, 4, 8 the rows are cut into ``p = 8 / b`` planes of ``m / p`` consecutive
    rows; byte ``[i, c]`` holds row ``i + j*m/p`` of column ``c`` in its bits ``j*b`` to
    ``j*b + b - 1``. Unpacking is then a few bitwise operations and one concatenation of
    contiguous planes. 3-bit codes are stored as their low two bits packed as 2-bit codes
    (``m/4`` rows) followed by their high bit packed as 1-bit codes (``m/8`` rows).
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() < 2:
        raise ValueError(
            f"codes must be a uint8 tensor [..., m, k], got {codes.dtype} {tuple(codes.shape)}"
        )
    if codes.shape[-2] % rows_multiple(bits):
        raise ValueError(
            f"the row count ({codes.shape[-2]}) must be a multiple of {rows_multiple(bits)}"
        )
    if bits == 3:
        return torch.cat([pack_codes(codes & 3, 2), pack_codes(codes >> 2, 1)], dim=-2)
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.contiguous()
    planes = codes.chunk(per_byte, dim=-2)
    packed = planes[0].clone()
    for j in range(1, per_byte):
        packed |= planes[j] << (bits * j)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of [`pack_codes()`][sketchcomm.gear.quantization.pack_codes]: ``[..., m*b/8, k]``
    bytes to ``[..., m, k]`` codes."""
    _check_bits(bits)
    if bits == 3:
        low_rows = packed.shape[-2] * 2 // 3
        low = unpack_codes(packed[..., :low_rows, :], 2)
        return low | (unpack_codes(packed[..., low_rows:, :], 1) << 2)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    planes = [packed & mask] + [(packed >> (bits * j)) & mask for j in range(1, per_byte)]
    return torch.cat(planes, dim=-2)


@dataclass
class GroupQuantized:
    """A tensor ``[..., n, d]`` quantized group-wise, as produced by
    [`quantize()`][sketchcomm.gear.quantization.quantize].

    Attributes:
        codes: packed codes, ``uint8`` of shape ``[..., n'*b/8, d']`` (``n'``, ``d'``: padded).
        scale: float16 step ``s`` of every group: ``[..., n', d'/g]`` for ``mode="token"``,
            ``[..., n'/g, d']`` for ``mode="channel"``.
        minimum: float16 minimum ``m`` of every group (the zero point), shaped like ``scale``.
        bits: bits per code.
        matrix_scales: ``None`` for float16 ``scale`` and ``minimum``; with 8-bit metadata, the
            float16 ``(μ, δ, σ)`` of every matrix, ``[..., 3]``, and ``scale`` and ``minimum``
            are then the uint8 codes ``c`` and ``a`` (see the module docstring).
        mode: ``"token"`` or ``"channel"`` (the axis the groups run along, see the module doc).
        n: tokens of the unpadded tensor.
        d: channels of the unpadded tensor.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    mode: QuantMode
    n: int
    d: int
    matrix_scales: torch.Tensor | None = None

    @property
    def lead_shape(self) -> torch.Size:
        """The leading dimensions ``[...]``."""
        return self.codes.shape[:-2]

    def steps_and_minima(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 step ``s`` and minimum ``m`` of every group, each shaped like ``scale``."""
        if self.matrix_scales is None:
            return self.scale.float(), self.minimum.float()
        return decode_metadata(self.scale, self.minimum, self.matrix_scales)

    def dequantize(self) -> torch.Tensor:
        """Return ``x̂ = m + s q`` as a float32 tensor of shape ``[..., n, d]``."""
        codes = unpack_codes(self.codes, self.bits).float()
        *lead, rows, cols = codes.shape
        scale, minimum = self.steps_and_minima()
        if self.mode == "token":
            groups = self.scale.shape[-1]
            grouped = codes.view(*lead, rows, groups, cols // groups)
            scale, minimum = scale.unsqueeze(-1), minimum.unsqueeze(-1)
        else:
            groups = self.scale.shape[-2]
            grouped = codes.view(*lead, groups, rows // groups, cols)
            scale, minimum = scale.unsqueeze(-2), minimum.unsqueeze(-2)
        values = torch.addcmul(minimum, grouped, scale).view(*lead, rows, cols)
        if (rows, cols) != (self.n, self.d):
            values = values[..., : self.n, : self.d]
        return values

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this object holds."""
        held = [self.codes, self.scale, self.minimum]
        return held if self.matrix_scales is None else [*held, self.matrix_scales]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and minima."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GroupQuantized:
        """A copy with ``fn`` applied to every held tensor (for operations on leading dims)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return GroupQuantized(
            **{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        )

    @staticmethod
    def cat(parts: list[GroupQuantized], dim: int) -> GroupQuantized:
        """Concatenate along leading dimension ``dim`` (counted from the front, ``dim >= 0``)."""
        first = parts[0]
        key = (first.bits, first.mode, first.n, first.d, first.matrix_scales is None)
        if any((p.bits, p.mode, p.n, p.d, p.matrix_scales is None) != key for p in parts):
            raise ValueError(
                "only tensors quantized with the same bits, mode, shape and metadata can be joined"
            )
        return GroupQuantized(
            codes=torch.cat([p.codes for p in parts], dim),
            scale=torch.cat([p.scale for p in parts], dim),
            minimum=torch.cat([p.minimum for p in parts], dim),
            bits=first.bits,
            mode=first.mode,
            n=first.n,
            d=first.d,
            matrix_scales=None
            if first.matrix_scales is None
            else torch.cat([p.matrix_scales for p in parts], dim),
        )


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    mode: QuantMode,
    exclude: torch.Tensor | None = None,
    metadata: MetadataFormat = "float16",
) -> GroupQuantized:
    """Quantize ``x`` of shape ``[..., n, d]`` group-wise to ``bits`` bits.

    Args:
        x: floating-point tensor ``[..., n, d]``.
        bits: 2, 3, 4 or 8 (1 is accepted too).
        group_size: entries per group along the grouped axis; a group never spans more than
            that axis (rounded up to a multiple of 4).
        mode: ``"token"`` (groups along ``d``) or ``"channel"`` (groups along ``n``).
        exclude: optional boolean mask ``[..., n, d]`` of entries left out of the group minima
            and maxima (they still get codes, which a caller overrides with exact values).
        metadata: ``"float16"`` steps and minima, or ``"8bit"`` codes (see the module docstring).

    Returns:
        The [`GroupQuantized`][sketchcomm.gear.quantization.GroupQuantized] tensor.
    """
    _check_bits(bits)
    if mode not in ("token", "channel"):
        raise ValueError(f"mode must be 'token' or 'channel', got {mode!r}")
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"x must have shape [..., n, d] with n, d > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if group_size < 4 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4, got {group_size}")
    if exclude is not None and exclude.shape != x.shape:
        raise ValueError(
            f"exclude must have the shape of x {tuple(x.shape)}, got {tuple(exclude.shape)}"
        )

    n, d = x.shape[-2:]
    if mode == "token":
        group = min(group_size, _round_up(d, 4))
        rows, cols, reduce_dim = _round_up(n, rows_multiple(bits)), _round_up(d, group), -1
    else:
        group = min(group_size, _round_up(n, 4))
        rows, cols, reduce_dim = _round_up(n, math.lcm(group, rows_multiple(bits))), d, -2
    work = _pad(x.float(), rows, cols)
    if mode == "token":
        grouped = work.view(*work.shape[:-1], cols // group, group)
    else:
        grouped = work.view(*work.shape[:-2], rows // group, group, cols)

    if exclude is None:
        low, high = grouped.amin(reduce_dim), grouped.amax(reduce_dim)
    else:
        mask = _pad(exclude, rows, cols).view(grouped.shape)
        low = grouped.masked_fill(mask, torch.inf).amin(reduce_dim)
        high = grouped.masked_fill(mask, -torch.inf).amax(reduce_dim)
        empty = mask.all(reduce_dim)
        low = low.masked_fill(empty, 0.0)
        high = high.masked_fill(empty, 0.0)

    levels = (1 << bits) - 1
    matrix_scales = None
    if metadata == "8bit":
        scale, minimum, matrix_scales = encode_metadata(low, high, levels)
        step, floor = decode_metadata(scale, minimum, matrix_scales)
    elif metadata == "float16":
        minimum = low.half()
        scale = ((high - minimum.float()) / levels).half()
        step, floor = scale.float(), minimum.float()
    else:
        raise ValueError(f"metadata must be 'float16' or '8bit', got {metadata!r}")
    if not (torch.isfinite(step).all() and torch.isfinite(floor).all()):
        raise ValueError("x has entries outside the float16 range of the quantization scales")
    step = torch.where(step > 0, step, torch.ones_like(low))
    codes = (grouped - floor.unsqueeze(reduce_dim)) / step.unsqueeze(reduce_dim)
    codes = codes.round_().clamp_(0, levels).to(torch.uint8).view(*work.shape)
    return GroupQuantized(
        codes=pack_codes(codes, bits),
        scale=scale,
        minimum=minimum,
        bits=bits,
        mode=mode,
        n=n,
        d=d,
        matrix_scales=matrix_scales,
    )


STEP_CODES_PER_OCTAVE = 16
"""Step codes per doubling of the step with 8-bit metadata: a code ``c`` stands for
``σ 2^{c/16}``, so that 256 codes span 16 octaves."""

STEP_FACTORS = torch.exp2(torch.arange(256, dtype=torch.float64) / STEP_CODES_PER_OCTAVE).float()
"""``2^{c/16}`` for every step code ``c``, computed once, so that decoding is a table look-up that
gives the same float32 step whatever the shape of the batch."""


def _half_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` in float16, rounded towards ``direction`` (``-inf``: at most ``x``; ``inf``: at
    least ``x``)."""
    half = x.half()
    toward = torch.full_like(half, direction)
    past = half.float() > x if direction < 0 else half.float() < x
    return torch.where(past, torch.nextafter(half, toward), half)


def encode_metadata(
    low: torch.Tensor, high: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit step and minimum codes of groups with minima ``low`` and maxima ``high``.

    Args:
        low: float32 group minima ``[..., r, c]`` (the last two dimensions: one matrix).
        high: float32 group maxima, shaped like ``low``.
        levels: ``2^b - 1``.

    Returns:
        ``(step codes c, minimum codes a, (μ, δ, σ))``: uint8 ``[..., r, c]`` twice and float16
        ``[..., 3]``, as the module docstring defines them.
    """
    flat_low = low.flatten(-2)
    base = _half_toward(flat_low.amin(-1), -torch.inf)
    span = _half_toward((flat_low.amax(-1) - base.float()) / 255, torch.inf)
    per_code = span.float()[..., None, None]
    offset = (low - base.float()[..., None, None]) / torch.where(per_code > 0, per_code, 1.0)
    minimum = offset.floor_().clamp_(0, 255)
    floor = base.float()[..., None, None] + minimum * per_code
    floor = torch.minimum(floor, low)  # float rounding must not lift a minimum above its group
    needed = (high - floor) / levels
    flat = needed.flatten(-2)
    smallest = torch.where(flat > 0, flat, torch.inf).amin(-1)
    largest = flat.amax(-1)
    lowest = largest * 2.0 ** (-255 / STEP_CODES_PER_OCTAVE)
    sigma = torch.where(torch.isfinite(smallest), torch.maximum(smallest, lowest), largest)
    sigma = _half_toward(torch.where(sigma > 0, sigma, 1.0), -torch.inf)
    # In float64, so that a code never depends on how the batch is laid out (vectorised float32
    # logarithms can differ in the last bit, which would flip a ceiling).
    ratio = needed.double() / sigma.double()[..., None, None]
    scale = (STEP_CODES_PER_OCTAVE * torch.log2(ratio.clamp_min(1.0))).ceil_().clamp_(0, 255)
    matrix_scales = torch.stack([base, span, sigma], dim=-1)
    return scale.to(torch.uint8), minimum.to(torch.uint8), matrix_scales


def decode_metadata(
    scale: torch.Tensor, minimum: torch.Tensor, matrix_scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 steps ``s' = σ 2^{c/16}`` and minima ``m' = μ + a δ`` of 8-bit metadata."""
    base, span, sigma = (matrix_scales[..., k, None, None].float() for k in range(3))
    steps = sigma * STEP_FACTORS.to(scale.device)[scale.long()]
    return steps, base + minimum.float() * span


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad ``[..., n, d]`` to ``[..., rows, cols]`` by repeating the last row and column."""
    n, d = t.shape[-2:]
    if cols > d:
        t = torch.cat([t, t[..., -1:].expand(*t.shape[:-1], cols - d)], dim=-1)
    if rows > n:
        t = torch.cat([t, t[..., -1:, :].expand(*t.shape[:-2], rows - n, cols)], dim=-2)
    return t.contiguous()


def _check_bits(bits: int) -> None:
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"bits must be 1, 2, 3, 4 or 8, got {bits!r}")
