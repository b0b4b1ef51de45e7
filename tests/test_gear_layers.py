"""Per-layer and per-tensor precision: ``GEARConfig(key_bits=..., per_layer=...)`` and the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sketchcomm.gear.cache import GEARCache, GEARLayer
from sketchcomm.gear.compression import compress
from sketchcomm.gear.config import GEARConfig


def small(**kwargs) -> GEARConfig:
    return GEARConfig(**{"group_size": 16, "buffer_size": 16, **kwargs})


def test_key_bits_quantize_the_keys_only() -> None:
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0)).half()
    mixed = small(bits=2, key_bits=4, rank=0)
    four, two = small(bits=4, rank=0), small(bits=2, rank=0)
    assert torch.equal(
        compress(x, mixed, "key").decompress(), compress(x, four, "key").decompress()
    )
    assert compress(x, mixed, "key").nbytes == compress(x, four, "key").nbytes
    assert torch.equal(
        compress(x, mixed, "value").decompress(), compress(x, two, "value").decompress()
    )
    assert mixed.describe() == "quant-only 2-bit k4 g16/64 r0 s0% nb16"


def test_per_layer_overrides_are_validated_normalised_and_described() -> None:
    config = small(bits=2, rank=0, per_layer={3: {"rank": 1, "key_bits": 4}, 1: {"key_bits": 3}})
    assert config.per_layer == ((1, (("key_bits", 3),)), (3, (("key_bits", 4), ("rank", 1))))
    assert hash(config) == hash(small(bits=2, rank=0, per_layer=config.per_layer))
    assert config.for_layer(3) == small(bits=2, key_bits=4, rank=1)
    assert config.for_layer(0) == small(bits=2, rank=0)
    assert config.describe().endswith("| L1: k3 | L3: k4 r1")
    assert config.describe().startswith("GEAR")  # a layer has a low-rank term
    assert not config.quantization_only().corrects
    assert config.quantization_only().for_layer(3) == small(bits=2, key_bits=4, rank=0)
    with pytest.raises(ValueError, match="cannot set \\['buffer_size'\\]"):
        small(per_layer={0: {"buffer_size": 32}})
    with pytest.raises(ValueError, match="per_layer\\[2\\]: key_bits"):
        small(per_layer={2: {"key_bits": 5}})
    with pytest.raises(ValueError, match="must compress"):
        small(per_layer={2: {"bits": None}})
    with pytest.raises(ValueError, match="layer index"):
        small(per_layer={-1: {"rank": 0}})
    with pytest.raises(ValueError, match="twice"):
        small(per_layer=[(1, {"rank": 0}), (1, {"rank": 2})])


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def test_cache_layers_take_their_override_and_count_their_bytes(model) -> None:
    # Keys after RoPE, so that the blocks compare with compress() of the cached keys.
    overrides = {1: {"key_bits": 4, "rank": 2}, 2: {"bits": 8}}
    config = small(bits=2, rank=0, per_layer=overrides, key_rope="post")
    cache = GEARCache(config, config=model.config)
    assert [layer.config for layer in cache.layers] == [config.for_layer(i) for i in range(3)]
    ids = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(ids[:, :40], cache=cache, use_cache=True)
        model(ids[:, 40:41], cache=cache, use_cache=True)  # compresses 2 blocks of 16 per layer
    for index, layer in enumerate(cache.layers):
        stream = layer.streams[0]
        expected = compress(stream_input(model, ids[:, :40], index), config.for_layer(index), "key")
        assert stream.compressed_keys.nbytes == expected.nbytes
        # The same codes up to the float rounding of the decoding kernel (a 2-bit layer read
        # with another layer's bits would be off by whole quantization steps).
        torch.testing.assert_close(
            stream.compressed_keys.decompress(), expected.decompress(), rtol=1e-4, atol=1e-5
        )
    sizes = [layer.nbytes for layer in cache.layers]
    assert sizes[0] < sizes[1] < sizes[2]  # 2-bit, then 4-bit keys with rank 2, then 8-bit
    with pytest.raises(ValueError, match="model has 3 layers"):
        GEARCache(small(per_layer={3: {"rank": 0}}), config=model.config)
    with pytest.raises(ValueError, match="needs the model's config"):
        GEARCache(small(per_layer={0: {"rank": 0}}))


def stream_input(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The first 32 keys of ``layer`` as blocks ``[b, heads, 2, 16, head_dim]`` (exact cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, cache=cache, use_cache=True)
    keys = cache.layers[layer].keys[..., :32, :]
    return keys.reshape(*keys.shape[:2], 2, 16, keys.shape[-1])


def test_uniform_override_is_the_plain_config(model) -> None:
    config = small(bits=4)
    same = dataclasses.replace(config, per_layer={0: dict(rank=config.rank)})
    assert same.for_layer(0) == config and same.for_layer(1) == config
    assert isinstance(GEARCache(same, config=model.config).layers[0], GEARLayer)
