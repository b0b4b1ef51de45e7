r"""The Gaussian mechanism in sketch space: per-bucket clipping thresholds, clipping, noise, and
the noise shares of the ranks under a threat model of ``t`` colluding ranks.

A step's release is the collection of every bucket's summed table. Each contribution (one
example, or one rank) has its table for bucket ``b`` clipped to Frobenius norm ``C_b`` with

.. math::

    C_b = C \sqrt{d_b / D}, \qquad \sum_b C_b^2 = C^2,

(``d_b`` the bucket's elements, ``D`` all trainable elements), so the concatenation of a
contribution's tables has norm at most ``C``: adding or removing one contribution moves the
released tables by at most ``C`` in L2. Every cell of every bucket's summed table receives Gaussian
noise (not ``sigma * C_b``), so the whole step is one Gaussian mechanism with sensitivity ``C``.
Clipping happens *after* sketching: a Count Sketch row is a linear map whose operator norm can
reach ``sqrt(d / c)``, so clipping the gradient and then sketching would not bound the table.

Threat model. Each rank knows its own noise share, so ``t`` ranks that collude (or one curious
rank, ``t = 1``) can subtract their shares from the aggregate. With ``noise_placement=
"distributed"`` each of the ``W`` ranks adds ``N(0, sigma^2 C^2 / (W - t))`` per cell: after any
``t`` shares are removed, ``N(0, sigma^2 C^2)`` remains, so the guaranteed noise multiplier
(towards outside observers and towards any ``t`` colluding ranks) is ``sigma``, and an outside
observer, who removes nothing, faces ``sigma sqrt(W / (W - t))``. ``"single"`` has rank 0 add all
of ``N(0, sigma^2 C^2)``; rank 0 then knows all the noise, so it holds only for ``t = 0``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from sketchcomm.validation import check_choice, check_float, check_int

__all__ = [
    "NOISE_PLACEMENTS",
    "SECURE_NOISE_DRAWS",
    "add_noise",
    "bucket_clip_norm",
    "check_threat_model",
    "clip_and_sum",
    "noise_share_std",
    "outsider_noise_multiplier",
    "private_generator",
    "resolve_colluding_ranks",
    "secure_gaussian",
]

NOISE_PLACEMENTS = ("distributed", "single")
PRIVACY_UNITS = ("example", "rank")

#: Gaussian draws summed per cell in secure mode (Holohan and Braghin 2021, section 5.1, n = 2).
SECURE_NOISE_DRAWS = 4


def bucket_clip_norm(clip_norm: float, bucket_elements: int, total_elements: int) -> float:
    """``C_b = C * sqrt(d_b / D)``."""
    if not 0 < bucket_elements <= total_elements:
        raise ValueError(f"bucket of {bucket_elements} elements out of {total_elements}")
    return clip_norm * math.sqrt(bucket_elements / total_elements)


def clip_and_sum(tables: Tensor, max_norm: float) -> tuple[Tensor, Tensor]:
    """Clip each contribution's table to Frobenius norm ``max_norm`` and sum them.

    A contribution whose table is not finite (NaN or Inf, e.g. one example's loss overflowed) is
    left out of the sum, as if it had not been sampled: its weight is 0, so adding or removing any
    one contribution still moves the sum by at most ``C_b``. A NaN kept in the sum would instead
    turn the whole release into NaN exactly when that one contribution is present, which reveals
    it whatever the noise.

    Args:
        tables: ``[n, r, c]`` tables, one per contribution (``n`` may be 0).
        max_norm: the threshold ``C_b``.

    Returns:
        the ``[r, c]`` sum of ``t_i * min(1, C_b / ||t_i||)`` over the finite ``t_i``, and the
        ``[n]`` norms before clipping (not finite for the contributions left out).
    """
    norms = tables.flatten(1).norm(dim=1)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    finite = torch.isfinite(norms)
    if not finite.all():  # rare: zero those contributions, and their cells (0 * NaN is NaN)
        factors = torch.where(finite, factors, 0.0)
        tables = tables.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return torch.einsum("n,nrc->rc", factors, tables), norms


def _checked_colluding_ranks(colluding_ranks: object, world: int) -> int:
    """``colluding_ranks`` if it is an integer ``t`` with ``0 <= t <= world - 1``."""
    if (
        isinstance(colluding_ranks, bool)
        or not isinstance(colluding_ranks, int)
        or not (0 <= colluding_ranks <= world - 1)
    ):
        raise ValueError(
            f"colluding_ranks must be an integer from 0 to world - 1 = {world - 1} (the ranks "
            f"that may pool their noise shares; at least one rank must be honest), got "
            f"{colluding_ranks!r}: pass a value in that range, or None for the unit's default"
        )
    return colluding_ranks


def resolve_colluding_ranks(colluding_ranks: int | None, unit: str, world: int) -> int:
    """The number ``t`` of ranks that may collude against the others' data.

    ``None`` means the default of the unit: 0 for ``unit="example"`` (the ranks are one trainer's
    trusted workers) and ``world - 1`` for ``unit="rank"`` (every other silo may collude; it is
    also the only value that holds against a rank that reads the allreduce's messages, since
    those carry partial sums of single tables).

    Raises:
        ValueError: unless ``0 <= t <= world - 1``.
    """
    check_choice("unit", unit, PRIVACY_UNITS)
    world = check_int("world", world, 1)
    if colluding_ranks is None:
        return 0 if unit == "example" else world - 1
    return _checked_colluding_ranks(colluding_ranks, world)


def check_threat_model(unit: str, placement: str, colluding_ranks: int, world: int) -> None:
    """Refuse a noise placement that cannot hold the threat model.

    ``placement="single"`` has rank 0 add all the noise, so rank 0 sees every other rank's
    clipped sum exactly: it is refused for ``unit="rank"`` (the other silos are the adversary)
    and for any ``colluding_ranks >= 1``.

    Raises:
        ValueError: naming the remedy, ``noise_placement="distributed"``.
    """
    check_choice("unit", unit, PRIVACY_UNITS)
    check_choice("noise_placement", placement, NOISE_PLACEMENTS)
    _checked_colluding_ranks(colluding_ranks, check_int("world", world, 1))
    if placement == "single" and unit == "rank":
        raise ValueError(
            "noise_placement='single' lets rank 0 see every other rank's clipped table without "
            "noise, which voids a guarantee between silos (unit='rank'): use "
            "noise_placement='distributed'"
        )
    if placement == "single" and colluding_ranks >= 1:
        raise ValueError(
            f"noise_placement='single' cannot hold against colluding_ranks={colluding_ranks}: "
            "rank 0 knows all the noise; use noise_placement='distributed'"
        )


def noise_share_std(
    noise_multiplier: float,
    max_grad_norm: float,
    rank: int,
    world: int,
    placement: str,
    colluding_ranks: int,
) -> float:
    r"""This rank's noise standard deviation per cell.

    ``"distributed"``: `σ C / √(W - t)` on every rank, so the ``W - t`` shares
    left after any ``t`` colluding ranks remove theirs add up to variance `σ^2 C^2`.
    ``"single"``: `σ C` on rank 0, 0 elsewhere (``t = 0`` only).
    """
    sigma = check_float("noise_multiplier", noise_multiplier, 0.0, math.inf, open_low=False)
    clip = check_float("max_grad_norm", max_grad_norm, 0.0, math.inf, open_low=True)
    check_choice("noise_placement", placement, NOISE_PLACEMENTS)
    world = check_int("world", world, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an integer in [0, {world}), got {rank!r}")
    t = _checked_colluding_ranks(colluding_ranks, world)
    if placement == "single":
        check_threat_model("example", placement, t, world)
        return sigma * clip if rank == 0 else 0.0
    return sigma * clip / math.sqrt(world - t)


def outsider_noise_multiplier(
    noise_multiplier: float, world: int, placement: str, colluding_ranks: int
) -> float:
    r"""The multiplier an outside observer of the aggregate faces: all ``W`` shares stay in, so
    `σ √(W / (W - t))` for ``"distributed"`` and σ for ``"single"``."""
    sigma = check_float("noise_multiplier", noise_multiplier, 0.0, math.inf, open_low=False)
    check_choice("noise_placement", placement, NOISE_PLACEMENTS)
    world = check_int("world", world, 1)
    t = _checked_colluding_ranks(colluding_ranks, world)
    if placement == "single":
        check_threat_model("example", placement, t, world)
        return sigma
    return sigma * math.sqrt(world / (world - t))


def private_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the operating system's entropy, never shared between ranks."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def _urandom_unit_interval(count: int) -> np.ndarray:
    """``count`` float64 draws uniform on ``[0, 1)`` (53 random bits each) from ``os.urandom``."""
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def secure_gaussian(shape: torch.Size | tuple[int, ...], std: float) -> Tensor:
    r"""``N(0, std^2)`` draws of ``shape`` (float64, CPU) from the operating system's CSPRNG.

    Uniform bits come from ``os.urandom`` (the kernel's cryptographically secure generator);
    Box-Muller turns pairs of uniforms into pairs of independent standard normals. Against the
    floating-point attacks on Gaussian samplers (Holohan and Braghin 2021, arXiv:2107.10138;
    Jin et al. 2022, arXiv:2112.05307) each cell is the sum of `SECURE_NOISE_DRAWS` = 4
    independent draws of `N(0, std²)` divided by 2, the construction of Opacus's
    secure mode (section 5.1 of the first paper, ``n = 2``). No ``torch.Generator`` is used.
    """
    cells = math.prod(shape)
    pairs = (SECURE_NOISE_DRAWS * cells + 1) // 2
    uniform = _urandom_unit_interval(2 * pairs).reshape(2, pairs)
    radius = np.sqrt(-2.0 * np.log1p(-uniform[0]))  # 1 - u lies in (0, 1]: log is finite
    angle = 2.0 * math.pi * uniform[1]
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    draws = normals[: SECURE_NOISE_DRAWS * cells].reshape(SECURE_NOISE_DRAWS, cells)
    summed = draws.sum(axis=0) * (std / math.sqrt(SECURE_NOISE_DRAWS))
    return torch.from_numpy(summed).reshape(shape)


def add_noise(
    table: Tensor,
    std: float,
    generator: torch.Generator | None,
    secure_mode: bool,
) -> Tensor:
    """Add ``N(0, std^2)`` to every cell of ``table`` in place.

    In secure mode the noise comes from
    [`secure_gaussian()`][sketchcomm.privacy.mechanism.secure_gaussian] (the operating system's
    CSPRNG, summed draws against floating-point attacks) and ``generator`` is not used; otherwise
    from ``torch.normal`` with ``generator`` (a `private_generator()`: Mersenne Twister seeded from
    the operating system, fast but not cryptographically secure).
    """
    if std <= 0:
        return table
    if secure_mode:
        noise = secure_gaussian(table.shape, std)
        table.add_(noise.to(device=table.device, dtype=table.dtype))
    else:
        table.add_(
            torch.normal(
                0.0, std, table.shape, generator=generator, device=table.device, dtype=table.dtype
            )
        )
    return table
