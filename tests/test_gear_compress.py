"""GEAR tensor compression: packing, quantization bounds, low rank, outliers and byte counts."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from sketchcomm.gear.compression import CompressedTensor, compress
from sketchcomm.gear.config import GEARConfig
from sketchcomm.gear.lowrank import power_iteration
from sketchcomm.gear.quantization import pack_codes, quantize, unpack_codes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these small models gain nothing from more, and workers share cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kv_like(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Key-like data: per-channel offsets and scales, a low-rank component and heavy tails."""
    g = torch.Generator().manual_seed(seed)
    *lead, n, d = shape
    offset = torch.randn(*lead, 1, d, generator=g) * 2
    scale = torch.rand(*lead, 1, d, generator=g) * 2 + 0.1
    low = torch.randn(*lead, n, 2, generator=g) @ torch.randn(*lead, 2, d, generator=g)
    noise = torch.distributions.StudentT(3.0).sample((*lead, n, d))
    return offset + scale * (noise + low)


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / x.float().norm()).item()


def held_bytes(ct: CompressedTensor) -> int:
    """Bytes of every tensor attribute of the object, found by walking its fields."""
    total = 0
    for obj in (ct, ct.quantized):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_roundtrip_and_density(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 64, 5), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 64 * bits // 8, 5)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_layout_puts_row_planes_in_the_bits_of_a_byte() -> None:
    codes = torch.tensor([[1, 0], [2, 1], [3, 2], [0, 3]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 0 | 1 << 2 | 2 << 4 | 3 << 6]]
    assert pack_codes(codes, 4).tolist() == [[1 | 3 << 4, 0 | 2 << 4], [2, 1 | 3 << 4]]
    # 3 bits: the low two bits as 2-bit codes (2 rows of bytes), then the high bit (1 row).
    codes = torch.arange(8, dtype=torch.uint8)[:, None]
    packed = pack_codes(codes, 3).flatten().tolist()
    assert packed[:2] == [0 | 2 << 2 | 0 << 4 | 2 << 6, 1 | 3 << 2 | 1 << 4 | 3 << 6]
    assert packed[2] == 0b11110000


@pytest.mark.parametrize("mode", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_error_is_within_half_a_step(bits: int, mode: str) -> None:
    x = kv_like((2, 3, 64, 32))
    q = quantize(x, bits, 16, mode)
    err = (q.dequantize() - x).abs()
    # The step of each entry's group, broadcast back to [..., n, d].
    step = q.scale.float().repeat_interleave(16, dim=-1 if mode == "token" else -2)
    slack = 1e-3 * x.abs().amax()  # float16 rounding of the stored minimum and step
    assert torch.all(err <= step / 2 + slack)


@pytest.mark.parametrize("mode", ["token", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_eight_bit_metadata_keeps_each_group_within_its_levels(bits: int, mode: str) -> None:
    """With ``metadata="8bit"`` every group's minimum is at most its smallest entry and its
    range fits in the ``2^b`` levels, so the error stays within half the decoded step; that step
    is at most 2^(1/16) times the exact step plus the minimum code's spacing over the levels; it
    takes 2 bytes per group plus 6 per matrix instead of 4 per group."""
    x = kv_like((2, 3, 64, 32), seed=bits)
    exact = quantize(x, bits, 16, mode)
    small = quantize(x, bits, 16, mode, metadata="8bit")
    axis = -1 if mode == "token" else -2
    step, floor = (t.repeat_interleave(16, dim=axis) for t in small.steps_and_minima())
    assert small.scale.dtype == small.minimum.dtype == torch.uint8
    assert torch.all(floor <= x + 1e-5)
    levels = (1 << bits) - 1
    assert torch.all(x <= floor + levels * step + 1e-4)
    assert torch.all((small.dequantize() - x).abs() <= step / 2 + 1e-4)
    grouped = x.view(2, 3, 64, 2, 16) if mode == "token" else x.view(2, 3, 4, 16, 32)
    reduce = -1 if mode == "token" else -2
    true_step = (grouped.amax(reduce) - grouped.amin(reduce)) / levels
    spacing = small.matrix_scales[..., 1].float()[..., None, None]
    bound = (true_step + spacing / levels) * 2 ** (1 / 16) * (1 + 1e-5) + 1e-6
    assert torch.all(small.steps_and_minima()[0] <= bound)
    groups = exact.scale.numel()
    assert exact.nbytes - small.nbytes == 2 * groups - 6 * 2 * 3


def test_eight_bit_metadata_through_compress_and_cat() -> None:
    """GEAR with 8-bit metadata: joining compressed parts keeps each part's decompression, and
    the error is close to that of float16 metadata."""
    x = kv_like((1, 2, 4, 32, 64))
    config = GEARConfig(bits=4, metadata="8bit")
    parts = [compress(x[:, :, :2], config, "key"), compress(x[:, :, 2:], config, "key")]
    joined = CompressedTensor.cat(parts, dim=2)
    assert torch.equal(joined.decompress(), torch.cat([p.decompress() for p in parts], dim=2))
    assert joined.quantized.matrix_scales.shape == (1, 2, 4, 3)
    float16 = GEARConfig(bits=4, metadata="float16")
    exact = compress(x, float16, "key")
    assert rel_error(x, joined.decompress()) < 1.1 * rel_error(x, exact.decompress())
    with pytest.raises(ValueError, match="metadata"):
        CompressedTensor.cat([parts[0], compress(x[:, :, 2:], float16, "key")], 2)


def test_eight_bit_is_nearly_exact() -> None:
    x = kv_like((2, 3, 64, 64))
    config = GEARConfig(bits=8, rank=0, outlier_ratio=0.0)
    # Heavy-tailed data stretch the min-max range; 8 bits still keep the error below 1%.
    assert rel_error(x, compress(x, config, "key").decompress()) < 1e-2
    assert rel_error(x, compress(x, config, "value").decompress()) < 1e-2
    assert (
        rel_error(
            x,
            compress(
                x, GEARConfig(bits=4, corrected="both", rank=0, outlier_ratio=0.0)
            ).decompress(),
        )
        > 0.05
    )


def test_padding_of_a_partial_group() -> None:
    x = kv_like((1, 2, 50, 24))
    q = quantize(x, 4, 16, "channel")
    assert q.dequantize().shape == x.shape
    assert rel_error(x, q.dequantize()) < 0.1


@pytest.mark.parametrize("kind", ["key", "value"])
def test_error_falls_as_rank_rises(kind: str) -> None:
    x = kv_like((2, 2, 128, 64), seed=1)
    errors = [
        rel_error(
            x,
            compress(
                x, GEARConfig(bits=2, corrected="both", rank=r, outlier_ratio=0.0), kind
            ).decompress(),
        )
        for r in (0, 2, 8, 32)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("kind", ["key", "value"])
def test_error_falls_as_outlier_ratio_rises(kind: str) -> None:
    x = kv_like((2, 2, 128, 64), seed=2)
    errors = [
        rel_error(
            x,
            compress(
                x, GEARConfig(bits=2, corrected="both", rank=0, outlier_ratio=s), kind
            ).decompress(),
        )
        for s in (0.0, 0.01, 0.04, 0.1)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outliers_are_the_extremes_and_come_back_exactly(dtype: torch.dtype) -> None:
    x = kv_like((2, 3, 64, 32), seed=3).to(dtype)
    ct = compress(x, GEARConfig(bits=2, corrected="both", rank=2, outlier_ratio=0.05), "value")
    y = ct.decompress()
    assert y.dtype == dtype
    per_side = round(0.05 * 64 * 32 / 2)
    flat = x.reshape(2, 3, -1).float()
    expected = torch.cat(
        [flat.topk(per_side).indices, flat.topk(per_side, largest=False).indices], -1
    )
    index = ct.outlier_index.long()
    assert torch.equal(index.sort(-1).values, expected.sort(-1).values)
    assert torch.equal(y.reshape(2, 3, -1).gather(-1, index), x.reshape(2, 3, -1).gather(-1, index))


def test_nbytes_counts_every_held_tensor() -> None:
    x = kv_like((2, 3, 64, 64)).half()
    for config in (
        GEARConfig(
            bits=2, group_size=64, buffer_size=64, corrected="both", rank=4, outlier_ratio=0.02
        ),
        GEARConfig(
            bits=4, group_size=64, buffer_size=64, corrected="both", rank=2, outlier_ratio=0.02
        ),
        GEARConfig(
            bits=8, group_size=64, buffer_size=64, corrected="both", rank=0, outlier_ratio=0.0
        ),
    ):
        for metadata, group_bytes, matrix_bytes in (("float16", 4, 0), ("8bit", 2, 6)):
            ct = compress(x, dataclasses.replace(config, metadata=metadata), "key")
            assert ct.nbytes == held_bytes(ct)
            # Independent expectation from the layout: codes, a scale and a minimum per group of
            # 64 (float16, or uint8 codes plus three float16 per matrix), float16 factors, int16
            # index and float16 value per outlier.
            matrices, entries = 2 * 3, 64 * 64
            outliers = 2 * round(config.outlier_ratio * entries / 2)
            expected = matrices * (
                entries * config.bits // 8
                + group_bytes * entries // 64
                + matrix_bytes
                + 2 * config.rank * (64 + 64)
                + (2 + 2) * outliers
            )
            assert ct.nbytes == expected


def test_codes_are_really_packed() -> None:
    x = kv_like((1, 2, 64, 64))
    ct = compress(x, GEARConfig(bits=2, corrected="both", rank=0, outlier_ratio=0.0), "key")
    assert ct.quantized.codes.dtype == torch.uint8
    assert ct.quantized.codes.numel() == x.numel() // 4


def test_power_iteration_recovers_a_low_rank_matrix() -> None:
    g = torch.Generator().manual_seed(4)
    matrix = torch.randn(3, 40, 3, generator=g) @ torch.randn(3, 3, 24, generator=g)
    a, b = power_iteration(matrix, rank=3, iters=3)
    assert a.shape == (3, 40, 3) and b.shape == (3, 24, 3)
    assert torch.allclose(a.transpose(-1, -2) @ a, torch.eye(3).expand(3, 3, 3), atol=1e-5)
    assert rel_error(matrix, a @ b.transpose(-1, -2)) < 1e-5


def test_power_iteration_approaches_truncated_svd() -> None:
    x = kv_like((1, 64, 48), seed=5)[0]
    a, b = power_iteration(x, rank=4, iters=8)
    u, s, vh = torch.linalg.svd(x)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert rel_error(x, a @ b.T) < rel_error(x, best) * 1.02


def test_concatenation_along_a_leading_dim() -> None:
    config = GEARConfig(bits=4, corrected="both", rank=2, outlier_ratio=0.02)
    x = kv_like((2, 3, 4, 64, 16))
    whole = compress(x, config, "key")
    parts = CompressedTensor.cat([compress(x[:, :, :1], config), compress(x[:, :, 1:], config)], 2)
    assert torch.allclose(parts.decompress(), whole.decompress(), atol=1e-4)
    assert parts.nbytes == whole.nbytes


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 5}, "bits"),
        ({"bits": "four"}, "bits"),
        ({"group_size": 6}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"outlier_ratio": 0.5}, "outlier_ratio"),
        ({"outlier_ratio": -0.1}, "outlier_ratio"),
        ({"rank": -1}, "rank"),
        ({"power_iters": 0}, "power_iters"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_size": 48, "group_size": 32}, "buffer_size"),
        ({"key_mode": "row"}, "key_mode"),
        ({"enabled": "yes"}, "enabled"),
        ({"decoded_buffer": 1}, "decoded_buffer"),
        ({"corrected": "keys"}, "corrected"),
        ({"outlier_scope": "column"}, "outlier_scope"),
        ({"value_group_size": 6}, "value_group_size"),
        ({"value_mode": "channel", "value_group_size": 48}, "value group size"),
        ({"metadata": "float8"}, "metadata"),
    ],
)
def test_invalid_config_names_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GEARConfig(**kwargs)


def test_disabled_configs() -> None:
    assert not GEARConfig(bits=None).compresses
    assert not GEARConfig(bits="none").compresses
    assert not GEARConfig(enabled=False).compresses
    with pytest.raises(ValueError, match="disables compression"):
        compress(torch.ones(2, 4, 4), GEARConfig(bits=None))


def test_bad_tensors_are_rejected() -> None:
    config = GEARConfig()
    with pytest.raises(ValueError, match="floating-point"):
        compress(torch.ones(4, 4, dtype=torch.int64), config)
    with pytest.raises(ValueError, match="non-finite"):
        compress(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), config)


def test_correction_of_one_kind_only() -> None:
    """``corrected="key"``: keys get outliers and low rank, values are quantized only."""
    x = kv_like((2, 3, 64, 32))
    config = GEARConfig(bits=2, rank=2, outlier_ratio=0.04, corrected="key")
    keys, values = compress(x, config, "key"), compress(x, config, "value")
    assert keys.factor_a is not None and keys.outlier_index is not None
    assert values.factor_a is None and values.outlier_index is None
    plain = compress(x, config.quantization_only(), "value")
    assert torch.equal(values.decompress(), plain.decompress())


@pytest.mark.parametrize(
    ("bits", "kind", "rank", "outliers", "tokens", "metadata"),
    [
        (2, "key", 2, 0.02, 32, "float16"),
        (3, "key", 1, 0.0, 30, "float16"),
        (3, "value", 0, 0.0, 32, "8bit"),
        (4, "key", 1, 0.0, 32, "8bit"),
        (4, "value", 2, 0.02, 30, "float16"),
        (8, "value", 0, 0.0, 32, "float16"),
    ],
)
def test_compiled_decompression_matches_the_torch_path(
    monkeypatch, bits: int, kind: str, rank: int, outliers: float, tokens: int, metadata: str
) -> None:
    """The fused kernel (unpack, ``m + s q``, ``A Bᵀ``) gives the torch path's ``X̂`` to float32
    rounding, for padded groups too (30 tokens, 20 channels in groups of 16 / 8), into a new
    tensor, a float16 result, and a slice of a larger float32 tensor left untouched around it."""
    pytest.importorskip("numba")
    from sketchcomm.gear import decode_compiled

    monkeypatch.delenv("SKETCHCOMM_KERNELS", raising=False)
    assert decode_compiled.available()
    x = kv_like((2, 3, 4, tokens, 20), seed=bits)
    config = GEARConfig(
        bits=bits,
        rank=rank,
        outlier_ratio=outliers,
        corrected="both",
        group_size=16,
        value_group_size=8,
        buffer_size=32,
        metadata=metadata,
    )
    stored = compress(x, config, kind)
    compiled = stored.decompress()
    compiled_half = stored.decompress(torch.float16)
    big = torch.full((2, 3, 4 * tokens + 7, 20), 7.0)
    target = big[:, :, 3 : 3 + 4 * tokens].view(2, 3, 4, tokens, 20)
    stored.decompress(out=target)
    monkeypatch.setenv("SKETCHCOMM_KERNELS", "numpy")
    reference = stored.decompress()
    tolerance = 1e-6 * reference.abs().max().item()
    assert (compiled - reference).abs().max().item() <= tolerance
    assert (target - reference).abs().max().item() <= tolerance
    assert compiled_half.dtype == torch.float16
    half_reference = reference.half().float()
    assert torch.allclose(compiled_half.float(), half_reference, atol=tolerance, rtol=1e-3)
    assert (big[:, :, :3] == 7).all() and (big[:, :, 3 + 4 * tokens :] == 7).all()
