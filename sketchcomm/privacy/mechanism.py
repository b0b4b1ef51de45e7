r"""The Gaussian mechanism in sketch space: per-bucket clipping thresholds, clipping, noise.

A step's release is the collection of every bucket's summed table. Each contribution (one
example, or one rank) has its table for bucket ``b`` clipped to Frobenius norm ``C_b`` with

.. math::

    C_b = C \sqrt{d_b / D}, \qquad \sum_b C_b^2 = C^2,

(``d_b`` the bucket's elements, ``D`` all trainable elements), so the concatenation of a
contribution's tables has norm at most ``C``: adding or removing one contribution moves the
released tables by at most ``C`` in L2. Every cell of every bucket's summed table receives Gaussian
noise of standard deviation ``sigma * C`` (not ``sigma * C_b``), so the whole step is one Gaussian
mechanism with noise multiplier ``sigma`` and sensitivity ``C``, which is what the accountant is
told. Clipping happens *after* sketching: a Count Sketch row is a linear map whose operator norm
can reach ``sqrt(d / c)``, so clipping the gradient and then sketching would not bound the table.
"""

from __future__ import annotations

import math
import os

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor

NOISE_PLACEMENTS = ("distributed", "single")


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


def private_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the operating system's entropy, never shared between ranks."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def add_noise(
    table: Tensor,
    std: float,
    generator: torch.Generator | None,
    secure_mode: bool,
) -> Tensor:
    """Add ``N(0, std^2)`` to every cell of ``table`` in place (Opacus's noise generator; in secure
    mode it sums several draws to resist floating-point attacks)."""
    if std > 0:
        table.add_(_generate_noise(std, table, generator=generator, secure_mode=secure_mode))
    return table
