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
of GEAR) are left out of ``m`` and ``M``, which shrinks the step ``s`` of their group. Codes are
packed ``8 / b`` to a ``uint8`` (four 2-bit codes, two 4-bit codes or one 8-bit code per byte).
When the axis length is not a multiple of ``g`` it is padded by repeating its last entry, and the
padding's codes are stored (and counted) too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .config import QuantMode


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``b``-bit codes ``[..., m]`` (``uint8``, values below ``2^b``) into ``[..., m*b/8]``.

    Code ``j`` of a byte occupies bits ``j*b`` to ``j*b + b - 1`` of that byte.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {per_byte}")
    if per_byte == 1:
        return codes.contiguous()
    lanes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = lanes[..., 0].clone()
    for j in range(1, per_byte):
        packed |= lanes[..., j] << (bits * j)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., m*b/8]`` bytes to ``[..., m]`` codes (``uint8``)."""
    _check_bits(bits)
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    lanes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return lanes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass
class GroupQuantized:
    """A tensor ``[..., n, d]`` quantized group-wise, as produced by :func:`quantize`.

    Attributes:
        codes: packed codes, ``uint8`` of shape ``[..., rows, groups, g*b/8]`` where ``rows`` is
            ``n`` for ``mode="token"`` and ``d`` for ``mode="channel"``.
        scale: float16 step ``s`` of every group, ``[..., rows, groups]``.
        minimum: float16 minimum ``m`` of every group (the zero point), ``[..., rows, groups]``.
        bits: bits per code.
        mode: ``"token"`` or ``"channel"`` (the axis the groups run along, see the module doc).
        length: unpadded length of the grouped axis (``d`` for ``"token"``, ``n`` for
            ``"channel"``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    mode: QuantMode
    length: int

    def dequantize(self) -> torch.Tensor:
        """Return ``x̂ = m + s q`` as a float32 tensor of shape ``[..., n, d]``."""
        codes = unpack_codes(self.codes, self.bits)
        values = torch.addcmul(
            self.minimum.unsqueeze(-1).float(), codes.float(), self.scale.unsqueeze(-1).float()
        )
        values = values.flatten(-2)[..., : self.length]
        return values.transpose(-1, -2) if self.mode == "channel" else values

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this object holds."""
        return [self.codes, self.scale, self.minimum]

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and minima."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GroupQuantized:
        """A copy with ``fn`` applied to every held tensor (for operations on leading dims)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return GroupQuantized(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    @staticmethod
    def cat(parts: list[GroupQuantized], dim: int) -> GroupQuantized:
        """Concatenate along leading dimension ``dim`` (counted from the front, ``dim >= 0``)."""
        first = parts[0]
        if any((p.bits, p.mode, p.length) != (first.bits, first.mode, first.length) for p in parts):
            raise ValueError("only tensors quantized with the same bits, mode and length can be joined")
        return GroupQuantized(
            codes=torch.cat([p.codes for p in parts], dim),
            scale=torch.cat([p.scale for p in parts], dim),
            minimum=torch.cat([p.minimum for p in parts], dim),
            bits=first.bits,
            mode=first.mode,
            length=first.length,
        )


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    mode: QuantMode,
    exclude: torch.Tensor | None = None,
) -> GroupQuantized:
    """Quantize ``x`` of shape ``[..., n, d]`` group-wise to ``bits`` bits.

    Args:
        x: floating-point tensor ``[..., n, d]``.
        bits: 2, 4 or 8.
        group_size: entries per group along the grouped axis; a group never spans more than
            that axis (rounded up to a multiple of 4).
        mode: ``"token"`` (groups along ``d``) or ``"channel"`` (groups along ``n``).
        exclude: optional boolean mask ``[..., n, d]`` of entries left out of the group minima
            and maxima (they still get codes, which a caller overrides with exact values).

    Returns:
        The :class:`GroupQuantized` tensor.
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
        raise ValueError(f"exclude must have the shape of x {tuple(x.shape)}, got {tuple(exclude.shape)}")

    work = x.float()
    if mode == "channel":
        work = work.transpose(-1, -2)
        exclude = exclude.transpose(-1, -2) if exclude is not None else None
    length = work.shape[-1]
    group = min(group_size, -(-length // 4) * 4)
    work = _pad_last(work, group)
    grouped = work.reshape(*work.shape[:-1], work.shape[-1] // group, group)

    if exclude is None:
        low, high = grouped.amin(-1), grouped.amax(-1)
    else:
        mask = _pad_last(exclude, group).reshape(grouped.shape)
        low = grouped.masked_fill(mask, torch.inf).amin(-1)
        high = grouped.masked_fill(mask, -torch.inf).amax(-1)
        empty = mask.all(-1)
        low = low.masked_fill(empty, 0.0)
        high = high.masked_fill(empty, 0.0)

    levels = (1 << bits) - 1
    minimum = low.half()
    scale = ((high - minimum.float()) / levels).half()
    if not (torch.isfinite(minimum).all() and torch.isfinite(scale).all()):
        raise ValueError("x has entries outside the float16 range of the quantization scales")
    step = torch.where(scale > 0, scale.float(), torch.ones_like(low))
    codes = ((grouped - minimum.unsqueeze(-1).float()) / step.unsqueeze(-1)).round_()
    codes = codes.clamp_(0, levels).to(torch.uint8)
    return GroupQuantized(
        codes=pack_codes(codes, bits),
        scale=scale,
        minimum=minimum,
        bits=bits,
        mode=mode,
        length=length,
    )


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last dimension to a multiple of ``multiple`` by repeating its last entry."""
    missing = -t.shape[-1] % multiple
    if missing == 0:
        return t
    return torch.cat([t, t[..., -1:].expand(*t.shape[:-1], missing)], dim=-1)


def _check_bits(bits: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
