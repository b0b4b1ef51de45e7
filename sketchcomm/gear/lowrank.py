"""Low-rank approximation by power (subspace) iteration, the ``L`` term of GEAR.

For a batch of residual matrices ``R`` of shape ``[..., n, d]`` and a rank ``r``, subspace
iteration (as in PowerSGD, Vogels et al., 2019, which GEAR uses) starts from a Gaussian
``B_0 ∈ R^{d×r}`` and repeats ``T`` times

    A_t = orth(R B_{t-1}),        B_t = Rᵀ A_t,

where ``orth`` is the Q factor of a reduced QR decomposition. Then ``L = A_T B_Tᵀ = A_T A_Tᵀ R``
is the projection of ``R`` onto the ``r``-dimensional column space found, which converges to the
best rank-``r`` approximation (truncated SVD) at a rate set by the ratio of singular values
``σ_{r+1} / σ_r``. GEAR uses a few loops (``T = 3`` here by default).
"""

from __future__ import annotations

import torch


def power_iteration(
    residual: torch.Tensor, rank: int, iters: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``residual ≈ A Bᵀ``, ``A`` of shape ``[..., n, r]`` and ``B`` of shape ``[..., d, r]``.

    Args:
        residual: float tensor ``[..., n, d]``; every trailing matrix is approximated on its own.
        rank: requested rank ``r >= 1``; it is capped at ``min(n, d)``.
        iters: number of loops ``T >= 1``.
        seed: seed of the Gaussian start ``B_0`` (shared by all matrices of the batch).

    Returns:
        ``(A, B)`` in float32; ``A`` has orthonormal columns.
    """
    if residual.dim() < 2:
        raise ValueError(f"residual must have shape [..., n, d], got {tuple(residual.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    n, d = residual.shape[-2:]
    rank = min(rank, n, d)
    matrix = residual.float()
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    basis = torch.randn(d, rank, generator=generator, device=matrix.device)
    factor_b = basis.expand(*matrix.shape[:-2], d, rank)
    for _ in range(iters):
        factor_a = torch.linalg.qr(matrix @ factor_b).Q
        factor_b = matrix.transpose(-1, -2) @ factor_a
    return factor_a, factor_b
