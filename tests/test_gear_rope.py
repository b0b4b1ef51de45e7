"""Pre-RoPE keys: the rotation against a Llama's own, and the cache against a hand computation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sketchcomm.gear.cache import GEARCache, GEARLayer
from sketchcomm.gear.compression import compress
from sketchcomm.gear.config import GEARConfig
from sketchcomm.gear.rope import KeyRotation
from sketchcomm.gear.stream import BlockStream

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def tiny_llama(rope_parameters: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters=rope_parameters,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """The default RoPE, with queries and keys scaled up so that attention is peaked and the
    logits depend on where each key is read back."""
    model = tiny_llama(ROPES["default"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 72), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rope", list(ROPES))
@torch.inference_mode()
def test_unrotate_gives_the_keys_the_model_computed_before_rope(rope: str, tokens) -> None:
    model = tiny_llama(ROPES[rope])
    projected = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda module, args, out: projected.append(out)
    )
    cache = DynamicCache(config=model.config)
    model(tokens, cache=cache, use_cache=True)
    handle.remove()
    before = projected[0].view(2, 72, 2, 16).transpose(1, 2)  # [batch, kv heads, tokens, dim]
    cached = cache.layers[0].keys
    rotation = KeyRotation.from_config(model.config)
    assert not torch.allclose(cached, before, atol=1e-3)
    assert torch.allclose(rotation.unrotate(cached), before, atol=1e-5)
    assert torch.allclose(rotation.rotate(before), cached, atol=1e-5)
    tail = rotation.unrotate(cached[..., 10:, :], first=10)
    assert torch.allclose(tail, before[..., 10:, :], atol=1e-5)
    # Row 1 read as if padded by 4: its tokens 10.. are at positions 6..
    padded = rotation.unrotate(cached[..., 10:, :], 10, torch.tensor([0, 4]))
    assert torch.allclose(padded[0], before[0, :, 10:], atol=1e-5)
    assert torch.allclose(padded[1], rotation.unrotate(cached[1:, :, 10:], 6)[0], atol=1e-6)
    assert not torch.allclose(padded[1], before[1, :, 10:], atol=1e-3)


def test_layer_compresses_the_unrotated_keys_and_rotates_them_back() -> None:
    config = GEARConfig(bits=2, group_size=16, buffer_size=16, key_rope="pre")
    rotation = KeyRotation(10000.0 ** -torch.arange(0, 1, 1 / 8))
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 2, 41, 16, generator=g), torch.randn(2, 2, 41, 16, generator=g)
    layer = GEARLayer(config, rotation)
    layer.update(keys[..., :40, :], values[..., :40, :])
    got_keys, got_values = layer.update(keys[..., 40:, :], values[..., 40:, :])
    # By hand: two blocks of 16 tokens, un-rotated at positions 0..31, compressed, decompressed
    # and rotated back; the other 9 tokens exact.
    blocks = rotation.unrotate(keys[..., :32, :]).reshape(2, 2, 2, 16, 16)
    decoded = compress(blocks, config, "key").decompress().reshape(2, 2, 32, 16)
    assert torch.allclose(got_keys[..., :32, :], rotation.rotate(decoded), atol=1e-6)
    assert torch.equal(got_keys[..., 32:, :], keys[..., 32:, :])
    values_by_hand = compress(values[..., :32, :].reshape(2, 2, 2, 16, 16), config, "value")
    assert torch.equal(got_values[..., :32, :], values_by_hand.decompress().reshape(2, 2, 32, 16))


@torch.inference_mode()
def decode_logits(model, cache, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    out = model(tokens[:, :prefill], cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(prefill, tokens.shape[1]):
        logits.append(model(tokens[:, i : i + 1], cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1).float()


def test_pre_rope_cache_tracks_the_uncompressed_logits(model, tokens) -> None:
    reference = decode_logits(model, DynamicCache(config=model.config), tokens, 40)
    for key_rope in ("post", "pre"):
        config = GEARConfig(bits=8, group_size=16, buffer_size=16, key_rope=key_rope)
        logits = decode_logits(model, GEARCache(config, config=model.config), tokens, 40)
        assert (logits - reference).abs().max().item() < 1e-2, key_rope


def test_pre_rope_needs_a_rotary_model_config_and_auto_follows_the_model(model) -> None:
    with pytest.raises(ValueError, match="key_rope must be"):
        GEARConfig(key_rope="before")
    with pytest.raises(ValueError, match="needs the model's config"):
        GEARCache(GEARConfig(key_rope="pre"))
    dynamic = LlamaConfig(
        head_dim=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(ValueError, match="use key_rope='post'"):
        GEARCache(GEARConfig(key_rope="pre"), config=dynamic)
    with pytest.raises(ValueError, match="needs a KeyRotation"):
        GEARLayer(GEARConfig(key_rope="pre"))
    states = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match="pass no KeyRotation"):
        BlockStream(
            GEARConfig(key_rope="post"),
            0,
            states,
            states,
            torch.zeros(1),
            KeyRotation(torch.ones(8)),
        )
    # The default, "auto": before RoPE for a supported model, after it otherwise.
    assert GEARConfig().key_rope == "auto"
    assert all(layer.rotation is not None for layer in GEARCache(config=model.config).layers)
    post = GEARCache(GEARConfig(key_rope="post"), config=model.config)
    assert all(layer.rotation is None for layer in post.layers)
    assert all(layer.rotation is None for layer in GEARCache(config=dynamic).layers)
