"""The noise of the mechanism: shares under t colluding ranks, and the secure source."""

from __future__ import annotations

import math
import os

import pytest
import torch
from scipy import stats

from sketchcomm.privacy import mechanism
from sketchcomm.privacy.mechanism import (
    add_noise,
    check_threat_model,
    noise_share_std,
    outsider_noise_multiplier,
    private_generator,
    resolve_colluding_ranks,
    secure_gaussian,
)

CELLS = 60_000  # as many cells as the std checks below need to be within 3 %


def test_resolve_colluding_ranks_defaults_and_range() -> None:
    assert resolve_colluding_ranks(None, "example", 4) == 0
    assert resolve_colluding_ranks(None, "rank", 4) == 3
    assert resolve_colluding_ranks(None, "rank", 1) == 0
    assert resolve_colluding_ranks(2, "example", 4) == 2
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(
            ValueError, match="colluding_ranks must be an integer from 0 to world - 1"
        ):
            resolve_colluding_ranks(bad, "example", 4)
    with pytest.raises(ValueError, match="unit"):
        resolve_colluding_ranks(None, "user", 4)
    with pytest.raises(ValueError, match="colluding_ranks"):  # resolve None first
        noise_share_std(1.0, 1.0, 0, 4, "distributed", None)
    with pytest.raises(ValueError, match="colluding_ranks"):
        outsider_noise_multiplier(1.0, 4, "distributed", 4)


def test_single_placement_is_refused_where_rank_0_is_an_adversary() -> None:
    check_threat_model("example", "single", 0, 4)
    check_threat_model("rank", "distributed", 1, 2)
    with pytest.raises(ValueError, match=r"unit='rank'.*noise_placement='distributed'"):
        check_threat_model("rank", "single", 0, 2)
    with pytest.raises(ValueError, match=r"colluding_ranks=1.*noise_placement='distributed'"):
        check_threat_model("example", "single", 1, 2)
    with pytest.raises(ValueError, match="noise_placement"):
        check_threat_model("example", "everywhere", 0, 2)
    with pytest.raises(ValueError, match="noise_placement='distributed'"):
        noise_share_std(1.0, 1.0, 0, 2, "single", 1)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_share_arithmetic_leaves_sigma_c_after_any_t_shares_are_removed(world: int) -> None:
    sigma, clip = 1.3, 0.7
    for t in range(world):
        shares = [
            noise_share_std(sigma, clip, rank, world, "distributed", t) for rank in range(world)
        ]
        # the W - t honest shares together
        assert math.fsum(s**2 for s in shares[t:]) == pytest.approx((sigma * clip) ** 2, rel=1e-12)
        # an outsider sees all W of them
        outsider = outsider_noise_multiplier(sigma, world, "distributed", t)
        assert math.fsum(s**2 for s in shares) == pytest.approx((outsider * clip) ** 2, rel=1e-12)
        assert outsider == pytest.approx(sigma * math.sqrt(world / (world - t)), rel=1e-12)
    single = [noise_share_std(sigma, clip, rank, world, "single", 0) for rank in range(world)]
    assert single == [sigma * clip] + [0.0] * (world - 1)
    assert outsider_noise_multiplier(sigma, world, "single", 0) == sigma


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_left_after_one_colluding_rank_removes_its_share(secure_mode: bool) -> None:
    """W = 3, t = 1, real draws of add_noise: what remains after rank 0 subtracts its own share
    has std sigma C within 3 %; the full aggregate has std sigma C sqrt(3/2)."""
    sigma, clip, world, t = 1.2, 0.5, 3, 1
    shares = []
    for rank in range(world):
        table = torch.zeros(3, CELLS // 3)
        std = noise_share_std(sigma, clip, rank, world, "distributed", t)
        generator = None if secure_mode else private_generator(torch.device("cpu"))
        shares.append(add_noise(table, std, generator, secure_mode))
    aggregate = torch.stack(shares).sum(0).double()
    remaining = aggregate - shares[0].double()  # the curious rank knows its own share exactly
    assert remaining.std().item() == pytest.approx(sigma * clip, rel=0.03)
    outsider = outsider_noise_multiplier(sigma, world, "distributed", t)
    assert aggregate.std().item() == pytest.approx(outsider * clip, rel=0.03)


def test_secure_gaussian_is_normal() -> None:
    std = 2.5
    draws = secure_gaussian((CELLS,), std).numpy()
    assert draws.dtype.name == "float64"
    assert abs(draws.mean()) < 4 * std / math.sqrt(CELLS)
    assert draws.std() == pytest.approx(std, rel=0.03)
    # a Kolmogorov-Smirnov test against N(0, std^2): fails for a wrong shape or scale
    assert stats.kstest(draws, stats.norm(loc=0.0, scale=std).cdf).pvalue > 1e-4
    assert stats.kstest(draws, stats.norm(loc=0.0, scale=1.1 * std).cdf).pvalue < 1e-4


def test_secure_mode_reads_the_os_csprng_and_never_the_torch_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = private_generator(torch.device("cpu"))
    generator_state = generator.get_state()
    global_state = torch.get_rng_state()
    requested: list[int] = []
    real_urandom = os.urandom

    def counting_urandom(size: int) -> bytes:
        requested.append(size)
        return real_urandom(size)

    monkeypatch.setattr(mechanism.os, "urandom", counting_urandom)
    table = torch.zeros(4, 250, dtype=torch.float32)
    first = add_noise(table.clone(), 1.0, generator, secure_mode=True)
    second = add_noise(table.clone(), 1.0, generator, secure_mode=True)
    assert torch.equal(generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), global_state)
    # 4 summed draws per cell, 8 bytes (53 bits used) per uniform, 2 uniforms per 2 normals
    assert requested == [8 * 4 * 1000, 8 * 4 * 1000]
    assert first.dtype == torch.float32 and not torch.equal(first, second)


def test_standard_mode_draws_from_the_given_generator() -> None:
    table = torch.zeros(2, 500, dtype=torch.float64)
    first = add_noise(table.clone(), 0.5, torch.Generator().manual_seed(7), secure_mode=False)
    second = add_noise(table.clone(), 0.5, torch.Generator().manual_seed(7), secure_mode=False)
    assert torch.equal(first, second)
    assert first.std().item() == pytest.approx(0.5, rel=0.1)
    assert torch.equal(add_noise(table.clone(), 0.0, None, secure_mode=True), table)
