r"""The audit's variants: for each, the model, the background data, the canary and the score.

Every variant is a loss summed over outputs of linear maps without bias, so a contribution's
gradient is a known linear function of its input and the canary's gradient can be placed exactly.
The canary puts ``100 C`` (far above the clipping norm) on one coordinate ``i_b`` of each of the
model's ``n`` parameter blocks ``b`` (one DDP bucket each); its sketch table in bucket ``b`` is one
cell, clipped to ``C_b = C sqrt(d_b / D)``. The score is the likelihood-ratio projection of the
release on the canary's clipped tables,

.. math::

    \text{score} = \frac{1}{C} \sum_b \frac{C_b}{C} \, s_b(i_b) T_b[h_b(i_b)]
                 = \frac{N}{C} \sum_b \sqrt{d_b / D} \; \hat g_b[i_b],

read from the recovered gradient ``g_hat = S^T T / N`` (``N`` the normaliser). For the honest
mechanism it is ``N(b, sigma^2)`` without and ``N(b + 1, sigma^2)`` with the canary; a bucket
clipped to ``C`` instead of ``C_b`` shifts it by ``sum_b sqrt(d_b / D)`` (``sqrt(n)`` for equal
blocks).

Variants ([`VARIANTS`][sketchcomm.privacy.audit_variants.VARIANTS]):

``linear``
    ``nn.Linear(d, 1)`` on ``[B, d]``, one bucket, per example.
``tokens``
    the same ``nn.Linear(d, 1)`` applied to every token of ``[B, T, d]`` inputs, loss summed over
    tokens: an example's gradient is the sum of its tokens. The canary is one example whose ``T``
    tokens each carry ``100 C / T`` on ``i``; clipped per example it moves the release by ``C``,
    per token (rows that are not examples) by ``T C``.
``buckets``
    ``n`` equal blocks ``nn.Linear(d / n, 1)`` on the slices of a ``[B, d]`` input, each in its own
    DDP bucket (``bucket_cap_mb`` below one block), per example; the canary spans every block.
``rank``
    ``nn.Linear(d, 1)`` with ``unit="rank"``: rank 0's whole contribution is the canary (present)
    or nothing (absent: a zero gradient, while rank 0 still adds its noise share); the other ranks
    hold ``B`` background examples each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sketchcomm.sketch import derive_seed

if TYPE_CHECKING:
    from collections.abc import Callable

    from sketchcomm.privacy.audit_config import AuditConfig

__all__ = ["CANARY_SCALE", "VARIANTS", "AuditSetup", "BlockLinear", "Probe", "Variant"]

#: The canary's gradient norm per block in units of the clipping norm: far above it, so it is
#: clipped to ``C_b``.
CANARY_SCALE = 100.0


class BlockLinear(nn.Module):
    """``n`` linear maps ``nn.Linear(d / n, 1, bias=False)`` on the ``n`` slices of the last input
    dimension, outputs summed: ``[..., d] -> [..., 1]``, one parameter block per map.

    >>> BlockLinear(8, 4)(torch.ones(3, 8)).shape
    torch.Size([3, 1])
    """

    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        if dim % blocks:
            raise ValueError(f"dim ({dim}) must be a multiple of the number of blocks ({blocks})")
        self.blocks = nn.ModuleList(nn.Linear(dim // blocks, 1, bias=False) for _ in range(blocks))

    def forward(self, inputs: Tensor) -> Tensor:
        slices = inputs.chunk(len(self.blocks), dim=-1)
        return torch.stack([block(x) for block, x in zip(self.blocks, slices, strict=True)]).sum(0)


@dataclass(frozen=True)
class Probe:
    """One coordinate the score reads: element ``index`` of the ``parameter``-th parameter's
    gradient (in ``model.parameters()`` order), weighted by ``weight = C_b / C``."""

    parameter: int
    index: int
    weight: float


@dataclass
class AuditSetup:
    """What one rank runs: the model, its inputs without and with the canary (only rank 0's
    differ), the score's probes and DDP's bucket cap (None: DDP's default)."""

    model: nn.Module
    background: Tensor
    with_canary: Tensor
    probes: tuple[Probe, ...]
    bucket_cap_mb: float | None = None


@dataclass(frozen=True)
class Variant:
    """A variant: its unit of privacy, a one-line summary, the parameter block sizes ``d_b`` for
    a configuration (one DDP bucket each), and the builder of one rank's
    [`AuditSetup`][sketchcomm.privacy.audit_variants.AuditSetup]."""

    unit: str
    summary: str
    blocks: Callable[[AuditConfig], tuple[int, ...]]
    build: Callable[[AuditConfig, int], AuditSetup]


def _gaussian(config: AuditConfig, rank: int, *shape: int) -> Tensor:
    generator = torch.Generator().manual_seed(derive_seed("audit background", config.seed, rank))
    return torch.randn(*shape, generator=generator)


def _coordinate(config: AuditConfig, size: int, block: int = 0) -> int:
    return derive_seed("audit canary", config.seed, block) % size


def _single_probe(config: AuditConfig) -> tuple[Probe, ...]:
    return (Probe(0, _coordinate(config, config.dim), 1.0),)


def _point_canary(config: AuditConfig) -> Tensor:
    canary = torch.zeros(1, config.dim)
    canary[0, _coordinate(config, config.dim)] = CANARY_SCALE * config.max_grad_norm
    return canary


def _build_linear(config: AuditConfig, rank: int) -> AuditSetup:
    background = _gaussian(config, rank, config.background, config.dim)
    with_canary = torch.cat([background, _point_canary(config)]) if rank == 0 else background
    model = nn.Linear(config.dim, 1, bias=False)
    return AuditSetup(model, background, with_canary, _single_probe(config))


def _build_tokens(config: AuditConfig, rank: int) -> AuditSetup:
    background = _gaussian(config, rank, config.background, config.tokens, config.dim)
    spread = _point_canary(config)[:, None, :].expand(1, config.tokens, config.dim) / config.tokens
    with_canary = torch.cat([background, spread]) if rank == 0 else background
    model = nn.Linear(config.dim, 1, bias=False)
    return AuditSetup(model, background, with_canary, _single_probe(config))


def _build_buckets(config: AuditConfig, rank: int) -> AuditSetup:
    size = config.dim // config.buckets
    background = _gaussian(config, rank, config.background, config.dim)
    canary = torch.zeros(1, config.dim)
    probes = []
    for block in range(config.buckets):
        coordinate = _coordinate(config, size, block)
        canary[0, block * size + coordinate] = CANARY_SCALE * config.max_grad_norm
        probes.append(Probe(block, coordinate, math.sqrt(size / config.dim)))
    with_canary = torch.cat([background, canary]) if rank == 0 else background
    block_bytes = size * torch.finfo(torch.float32).bits // 8
    cap_mb = block_bytes / 2 / 2**20  # below one block: DDP closes a bucket after each block
    model = BlockLinear(config.dim, config.buckets)
    return AuditSetup(model, background, with_canary, tuple(probes), cap_mb)


def _build_rank(config: AuditConfig, rank: int) -> AuditSetup:
    model = nn.Linear(config.dim, 1, bias=False)
    if rank == 0:  # absent: no data, a zero gradient; present: the canary is its whole data
        return AuditSetup(
            model, torch.zeros(1, config.dim), _point_canary(config), _single_probe(config)
        )
    background = _gaussian(config, rank, config.background, config.dim)
    return AuditSetup(model, background, background, _single_probe(config))


def _one_block(config: AuditConfig) -> tuple[int, ...]:
    return (config.dim,)


VARIANTS: dict[str, Variant] = {
    "linear": Variant(
        "example", "nn.Linear(dim, 1) on [B, dim], one bucket", _one_block, _build_linear
    ),
    "tokens": Variant(
        "example",
        "nn.Linear(dim, 1) on every token of [B, tokens, dim], loss summed over tokens",
        _one_block,
        _build_tokens,
    ),
    "buckets": Variant(
        "example",
        "buckets x nn.Linear(dim / buckets, 1) on the slices of [B, dim], one DDP bucket each",
        lambda config: (config.dim // config.buckets,) * config.buckets,
        _build_buckets,
    ),
    "rank": Variant(
        "rank",
        "nn.Linear(dim, 1), unit='rank': rank 0's whole data is the canary or nothing",
        _one_block,
        _build_rank,
    ),
}
