"""GEAR compression of one key or value tensor.

GEAR (Kang et al., 2024, arXiv:2403.05527) approximates every ``[n, d]`` matrix ``X`` (``n``
tokens by ``d`` channels of one head; the tensor is ``[batch, kv_heads, seq, head_dim]`` or has
any leading dimensions) in three steps:

1. **Sparse outliers** ``S``: the ``k = round(s n d / 2)`` largest and the ``k`` smallest entries of
   ``X`` (``s`` is the outlier ratio) are kept exactly, as ``(flat index, value)`` pairs.
2. **Quantization** ``D̂``: the other entries are quantized group-wise to ``b`` bits
   ([`sketchcomm.gear.quantization`][sketchcomm.gear.quantization]); keys per channel and values per
   token by default (KIVI, Liu et al., 2024, arXiv:2402.02750). Outliers are left out of the group
   ranges.
3. **Low rank** ``L``: power iteration ([`sketchcomm.gear.lowrank`][sketchcomm.gear.lowrank]) fits a
   rank-``r``
   ``L = A Bᵀ`` to the residual ``R = X - D̂ - S``, which is zero at the outliers.

The reconstruction is ``X̂ = D̂ + L`` off the outliers and ``X̂ = S`` on them, so that outliers
come back exactly. Stored: packed codes, float16 scales and minima, float16 factors ``A``
(``[n, r]``) and ``B`` (``[d, r]``), and per matrix ``2k`` indices (int16 when ``n d <= 2^15``,
else int32) and ``2k`` values in the input's dtype. Per entry this costs about

    b + 32 / g + 16 r (1/n + 1/d) + s (index bits + value bits)

bits, against 16 for float16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from . import decode_compiled
from .config import GEARConfig, QuantMode
from .lowrank import power_iteration
from .quantization import GroupQuantized, quantize


@dataclass
class CompressedTensor:
    """A GEAR-compressed tensor of shape ``[..., n, d]``; every trailing matrix on its own.

    Attributes:
        quantized: the quantized part ``D̂`` (packed codes, scales, minima).
        factor_a: float16 ``A`` of shape ``[..., n, r]``, or ``None`` when ``r = 0``.
        factor_b: float16 ``B`` of shape ``[..., d, r]``, or ``None`` when ``r = 0``.
        outlier_index: flat indices ``i * d + j`` of the outliers, ``[..., 2k]``, or ``None``.
        outlier_value: their exact values, ``[..., 2k]`` in ``dtype``, or ``None``.
        n: tokens per matrix.
        d: channels per matrix.
        dtype: dtype of the original tensor (and of the outlier values).
        outlier_rows: ``None`` when ``outlier_index`` holds flat indices; ``"channel"`` or
            ``"token"`` when the outliers were chosen per row (``outlier_scope="row"``): then
            ``outlier_index`` is ``[..., rows, 2k]`` ``uint8`` positions within each channel
            (along the tokens) or each token (along the channels).

    >>> import torch
    >>> from sketchcomm.gear import GEARConfig, compress
    >>> x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(0))
    >>> packed = compress(x, GEARConfig(bits=4, rank=2, group_size=16, buffer_size=16))
    >>> packed.shape, packed.nbytes < x.numel() * 2  # fewer bytes than float16
    (torch.Size([2, 32, 16]), True)
    >>> bool((packed.decompress() - x).norm() < 0.1 * x.norm())
    True
    """

    quantized: GroupQuantized
    factor_a: torch.Tensor | None
    factor_b: torch.Tensor | None
    outlier_index: torch.Tensor | None
    outlier_value: torch.Tensor | None
    n: int
    d: int
    dtype: torch.dtype
    outlier_rows: QuantMode | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the tensor this object stands for, ``[..., n, d]``."""
        return torch.Size((*self.quantized.lead_shape, self.n, self.d))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds."""
        held = self.quantized.tensors()
        for t in (self.factor_a, self.factor_b, self.outlier_index, self.outlier_value):
            if t is not None:
                held.append(t)
        return held

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales, minima, low-rank factors, outlier indices and values."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def decompress(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return ``X̂`` (``D̂ + L``, and the exact outliers) as ``[..., n, d]`` in ``dtype``.

        On the CPU ``D̂ + L`` is computed by the fused kernel of
        [`sketchcomm.gear.decode_compiled`][sketchcomm.gear.decode_compiled] (straight into a
        float32 ``out``, with no temporary), elsewhere or without numba by torch operations.

        Args:
            dtype: dtype of the result; defaults to the dtype of the original tensor.
            out: optional tensor of shape ``[..., n, d]`` to write the result into (its dtype
                wins over ``dtype``); it may be a strided view, e.g. a slice of a larger tensor.
        """
        if out is not None and out.shape != self.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(self.shape)}")
        values = self._compiled_lossy_part(out)
        if values is None:
            values = self._lossy_part()
        if self.outlier_index is not None:
            values.view(*values.shape[:-2], self.n * self.d).scatter_(
                -1,
                self.flat_outlier_index(),
                self.outlier_value.float().flatten(-2 if self.outlier_rows else -1),
            )
        if out is None:
            return values.to(dtype or self.dtype)
        return values if values is out else out.copy_(values)

    def _lossy_part(self) -> torch.Tensor:
        """``D̂ + L`` as a new float32 tensor ``[..., n, d]``, with torch operations."""
        values = self.quantized.dequantize().contiguous()
        if self.factor_a is not None:
            rank = self.factor_a.shape[-1]
            values.view(-1, self.n, self.d).baddbmm_(
                self.factor_a.reshape(-1, self.n, rank).float(),
                self.factor_b.reshape(-1, self.d, rank).float().transpose(1, 2),
            )
        return values

    def _compiled_lossy_part(self, out: torch.Tensor | None) -> torch.Tensor | None:
        """``D̂ + L`` written by the compiled kernel, into ``out`` when it is a float32 tensor whose
        ``[n, d]`` matrices are contiguous, else into a new float32 tensor; ``None`` when the kernel
        does not run (not on the CPU, or numba unavailable)."""
        quantized = self.quantized
        if not (decode_compiled.available() and quantized.codes.device.type == "cpu"):
            return None
        lead = self.shape[:-2]
        blocks = lead[-1] if lead else 1
        shape = (math.prod(lead[:-1]), blocks)
        in_place = out is not None and decompresses_in_place(out)
        target = out if in_place else torch.empty(self.shape)
        strides = target.stride()
        if len(lead) > 1 and any(  # leading strides that cannot be merged into one
            strides[k] != strides[k + 1] * target.shape[k + 1] for k in range(len(lead) - 2)
        ):
            in_place, target = False, torch.empty(self.shape)
            strides = target.stride()
        rows = quantized.codes.shape[-2] * 8 // quantized.bits
        cols = quantized.codes.shape[-1]
        if quantized.mode == "token":
            group_rows, group_cols = 1, cols // quantized.scale.shape[-1]
        else:
            group_rows, group_cols = rows // quantized.scale.shape[-2], 1
        rank = 0 if self.factor_a is None else self.factor_a.shape[-1]
        factor_a = (
            torch.zeros(*shape, self.n, 0)
            if self.factor_a is None
            else self.factor_a.reshape(*shape, self.n, rank).float()
        )
        factor_bt = (
            torch.zeros(*shape, 0, self.d)
            if self.factor_b is None
            else self.factor_b.reshape(*shape, self.d, rank).transpose(-1, -2).float().contiguous()
        )
        matrix_stride = strides[-4] if len(lead) > 1 else 0
        block_stride = strides[-3] if lead else 0
        storage = torch.as_strided(target, (target.untyped_storage().nbytes() // 4,), (1,), 0)
        decode_compiled.dequantize_into(
            storage.numpy(),
            target.storage_offset(),
            (matrix_stride, block_stride, strides[-2]),
            quantized.codes.reshape(*shape, *quantized.codes.shape[-2:]).contiguous().numpy(),
            *(
                t.reshape(*shape, *t.shape[-2:]).contiguous().numpy()
                for t in quantized.steps_and_minima()
            ),
            quantized.bits,
            group_rows,
            group_cols,
            factor_a.contiguous().numpy(),
            factor_bt.numpy(),
        )
        return out if in_place else target.view(self.shape)

    def flat_outlier_index(self) -> torch.Tensor:
        """The outliers' flat indices ``i * d + j`` into each ``[n, d]`` matrix, ``[..., 2k']``."""
        index = self.outlier_index.long()
        if self.outlier_rows is None:
            return index
        rows = torch.arange(index.shape[-2], device=index.device)[:, None]
        if self.outlier_rows == "channel":  # row = channel j, position = token i
            return (index * self.d + rows).flatten(-2)
        return (rows * self.d + index).flatten(-2)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CompressedTensor:
        """A copy with ``fn`` applied to every held tensor; ``fn`` must act on leading dims only."""
        return replace(
            self,
            quantized=self.quantized.apply(fn),
            factor_a=None if self.factor_a is None else fn(self.factor_a),
            factor_b=None if self.factor_b is None else fn(self.factor_b),
            outlier_index=None if self.outlier_index is None else fn(self.outlier_index),
            outlier_value=None if self.outlier_value is None else fn(self.outlier_value),
        )

    @staticmethod
    def cat(parts: list[CompressedTensor], dim: int) -> CompressedTensor:
        """Concatenate compressed tensors along leading dimension ``dim`` (``dim >= 0``).

        The parts must share ``n``, ``d``, dtype and compression settings.
        """
        first = parts[0]
        if any((p.n, p.d, p.dtype) != (first.n, first.d, first.dtype) for p in parts):
            raise ValueError("only compressed tensors with the same n, d and dtype can be joined")

        def join(name: str) -> torch.Tensor | None:
            items = [getattr(p, name) for p in parts]
            if all(t is None for t in items):
                return None
            if any(t is None for t in items):
                raise ValueError(f"cannot join tensors with and without {name}")
            return torch.cat(items, dim)

        return replace(
            first,
            quantized=GroupQuantized.cat([p.quantized for p in parts], dim),
            factor_a=join("factor_a"),
            factor_b=join("factor_b"),
            outlier_index=join("outlier_index"),
            outlier_value=join("outlier_value"),
        )


def decompresses_in_place(out: torch.Tensor) -> bool:
    """Whether decompressing into ``out`` writes straight into it with no temporary (see
    [`CompressedTensor.decompress()`][sketchcomm.gear.compression.CompressedTensor.decompress]):
    a float32 CPU tensor whose ``[n, d]`` matrices are contiguous, and the compiled kernel
    available."""
    return (
        decode_compiled.available()
        and out.device.type == "cpu"
        and out.dtype == torch.float32
        and out.stride(-1) == 1
        and out.stride(-2) == out.shape[-1]
    )


def compress(
    x: torch.Tensor, config: GEARConfig, kind: Literal["key", "value"] = "key"
) -> CompressedTensor:
    """Compress ``x`` of shape ``[..., n, d]`` (e.g. ``[batch, kv_heads, seq, head_dim]``).

    Args:
        x: floating-point tensor; every trailing ``[n, d]`` matrix is compressed on its own.
        config: the GEAR settings; it must compress (``config.compresses``).
        kind: ``"key"`` or ``"value"``, which selects ``config.key_mode`` or
            ``config.value_mode`` for the quantization groups.

    Returns:
        The [`CompressedTensor`][sketchcomm.gear.compression.CompressedTensor]; ``decompress()``
        gives back a tensor like ``x``.
    """
    if not config.compresses:
        raise ValueError("config disables compression (bits is None or enabled is False)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating-point tensor of shape [..., n, d]")
    n, d = x.shape[-2:]
    if n == 0 or d == 0:
        raise ValueError(f"x must have n, d > 0, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x has non-finite entries")
    mode = config.mode_for(kind)
    work = x.float()

    outlier_index = outlier_value = mask = outlier_rows = None
    if config.corrected not in ("both", kind):  # quantization only for this kind
        config = config.quantization_only()
    if config.outlier_scope == "row":
        # One row per channel (along the tokens) or per token (along the channels).
        lines = work.transpose(-1, -2) if mode == "channel" else work
        per_side = round(config.outlier_ratio * lines.shape[-1] / 2)
        if per_side > 0:
            index = torch.cat(
                [
                    lines.topk(per_side, dim=-1).indices,
                    lines.topk(per_side, dim=-1, largest=False).indices,
                ],
                dim=-1,
            )
            source = x.transpose(-1, -2) if mode == "channel" else x
            outlier_value = source.gather(-1, index)
            mask = torch.zeros_like(lines, dtype=torch.bool).scatter_(-1, index, True)
            mask = mask.transpose(-1, -2) if mode == "channel" else mask
            outlier_index = index.to(torch.uint8 if lines.shape[-1] <= 256 else torch.int16)
            outlier_rows = mode
    else:
        per_side = round(config.outlier_ratio * n * d / 2)
        if per_side > 0:
            flat = work.reshape(*x.shape[:-2], n * d)
            index = torch.cat(
                [
                    flat.topk(per_side, dim=-1).indices,
                    flat.topk(per_side, dim=-1, largest=False).indices,
                ],
                dim=-1,
            )
            outlier_value = x.reshape(flat.shape).gather(-1, index)
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, index, True)
            mask = mask.view(work.shape)
            outlier_index = index.to(torch.int16 if n * d <= 2**15 else torch.int32)

    quantized = quantize(
        work,
        config.bits_for(kind),
        config.group_size_for(kind),
        mode,
        exclude=mask,
        metadata=config.metadata,
    )

    factor_a = factor_b = None
    if config.rank > 0:
        residual = work - quantized.dequantize()
        if mask is not None:
            residual.masked_fill_(mask, 0.0)
        factor_a, factor_b = power_iteration(residual, config.rank, config.power_iters, config.seed)
        factor_a, factor_b = factor_a.half(), factor_b.half()

    return CompressedTensor(
        quantized=quantized,
        factor_a=factor_a,
        factor_b=factor_b,
        outlier_index=outlier_index,
        outlier_value=outlier_value,
        n=n,
        d=d,
        dtype=x.dtype,
        outlier_rows=outlier_rows,
    )
