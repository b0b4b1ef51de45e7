"""GEARCache on a tiny random Llama (grouped-query attention, batch of two) and on raw tensors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig

from sketchcomm.gear.cache import GEARCache, GEARLayer
from sketchcomm.gear.compression import compress
from sketchcomm.gear.config import GEARConfig
from sketchcomm.gear.rope import KeyRotation


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these small models gain nothing from more, and workers share cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
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
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 72), generator=torch.Generator().manual_seed(1))


def small_config(**kwargs) -> GEARConfig:
    return GEARConfig(**{"group_size": 16, "buffer_size": 16, "corrected": "both", **kwargs})


@torch.inference_mode()
def decode_logits(model, cache, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill then of one token per step, ``[batch, steps + 1, vocab]``."""
    out = model(tokens[:, :prefill], cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(prefill, tokens.shape[1]):
        out = model(tokens[:, i : i + 1], cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    ref = reference.float().log_softmax(-1)
    return (ref.exp() * (ref - logits.float().log_softmax(-1))).sum(-1).mean().item()


@pytest.mark.parametrize(
    "make",
    [
        lambda cfg: GEARCache(GEARConfig(bits=None), config=cfg),
        lambda cfg: GEARCache(GEARConfig(bits="none")),
        lambda cfg: GEARCache(GEARConfig(bits=2, enabled=False), config=cfg),
    ],
)
def test_disabled_cache_equals_dynamic_cache(model, tokens, make) -> None:
    reference = decode_logits(model, DynamicCache(config=model.config), tokens, prefill=40)
    cache = make(model.config)
    assert torch.equal(decode_logits(model, cache, tokens, prefill=40), reference)
    assert cache.nbytes == sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def test_compressed_logits_track_the_uncompressed_ones(model, tokens) -> None:
    reference = decode_logits(model, DynamicCache(config=model.config), tokens, prefill=40)
    divergence = {
        bits: kl(reference, decode_logits(model, GEARCache(small_config(bits=bits)), tokens, 40))
        for bits in (8, 4, 2)
    }
    assert divergence[8] < 1e-4
    assert divergence[8] < divergence[4] < divergence[2]
    quant_only = small_config(bits=2).quantization_only()
    assert divergence[2] < kl(reference, decode_logits(model, GEARCache(quant_only), tokens, 40))


def test_generate_matches_a_hand_written_greedy_loop(model, tokens) -> None:
    config = small_config(bits=4, rank=2)
    prompt = tokens[:, :40]
    generated = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        cache=GEARCache(config, config=model.config),
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
        pad_token_id=0,
    )[:, 40:]

    cache = GEARCache(config, config=model.config)
    with torch.inference_mode():
        out = model(prompt, cache=cache, use_cache=True)
        loop = [out.logits[:, -1].argmax(-1)]
        for _ in range(23):
            out = model(loop[-1][:, None], cache=cache, use_cache=True)
            loop.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(generated, torch.stack(loop, 1))
    assert cache.get_seq_length() == 40 + 23
    assert all(layer.streams[0].compressed_blocks == 3 for layer in cache.layers)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_generate_accepts_past_key_values(model, tokens) -> None:
    cache = GEARCache(small_config(bits=4))
    out = model.generate(
        tokens[:, :20],
        attention_mask=torch.ones_like(tokens[:, :20]),
        past_key_values=cache,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert out.shape == (2, 40)
    assert cache.get_seq_length() == 39
    assert isinstance(cache.layers[0], GEARLayer) and cache.layers[0].streams[0].compressed_blocks


def test_layer_returns_decompressed_blocks_then_exact_tokens() -> None:
    g = torch.Generator().manual_seed(2)
    config = small_config(bits=2, rank=2, outlier_ratio=0.05)
    first_k, first_v = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g)
    layer = GEARLayer(config)
    keys, values = layer.update(first_k, first_v)
    assert torch.equal(keys, first_k) and torch.equal(values, first_v)
    (stream,) = layer.streams
    assert stream.keys.shape[-2] == 40 and stream.compressed_blocks == 0  # compressed next call

    new_k, new_v = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
    keys, values = layer.update(new_k, new_v)
    for got, first, new, kind in ((keys, first_k, new_k, "key"), (values, first_v, new_v, "value")):
        blocks = compress(first[..., :32, :].reshape(2, 3, 2, 16, 8), config, kind)
        expected_old = blocks.decompress().reshape(2, 3, 32, 8)
        assert torch.equal(got[..., :32, :], expected_old)
        assert torch.equal(got[..., 32:40, :], first[..., 32:, :])
        assert torch.equal(got[..., 40:, :], new)
    assert stream.keys.shape[-2] == 9 and stream.compressed_keys.shape == (2, 3, 2, 16, 8)
    assert layer.get_seq_length() == 41


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_returns_the_model_dtype(dtype: torch.dtype) -> None:
    layer = GEARLayer(small_config(bits=4))
    states = torch.randn(1, 2, 33, 8).to(dtype)
    layer.update(states, states)
    keys, values = layer.update(states[..., :1, :], states[..., :1, :])
    assert keys.dtype == values.dtype == dtype
    assert keys.shape == (1, 2, 34, 8)


def test_nbytes_is_what_the_layers_hold(model, tokens) -> None:
    cache = GEARCache(small_config(bits=2, rank=2), config=model.config)
    decode_logits(model, cache, tokens, prefill=40)
    held = 0
    for layer in cache.layers:
        (stream,) = layer.streams
        held += sum(t.numel() * t.element_size() for t in (stream.keys, stream.values))
        for stored in (stream.compressed_keys, stream.compressed_values):
            held += sum(t.numel() * t.element_size() for t in stored.tensors())
    assert cache.nbytes == held
    # 72 tokens cached: 64 in four compressed blocks, 8 in the float32 buffer.
    assert all(layer.streams[0].keys.shape[-2] == 8 for layer in cache.layers)
    float32_bytes = 2 * 2 * 2 * 72 * 2 * 16 * 4  # layers, (K, V), batch, tokens, heads, head_dim
    assert cache.nbytes < float32_bytes / 2


def test_batch_reorder_and_select_act_on_compressed_rows(model, tokens) -> None:
    config = small_config(bits=4, rank=2)
    swapped = tokens.flip(0)
    cache = GEARCache(config, config=model.config)
    decode_logits(model, cache, tokens[:, :50], prefill=40)
    cache.reorder_cache(torch.tensor([1, 0]))
    reference = GEARCache(config, config=model.config)
    decode_logits(model, reference, swapped[:, :50], prefill=40)
    with torch.inference_mode():
        got = model(swapped[:, 50:51], cache=cache, use_cache=True).logits
        want = model(swapped[:, 50:51], cache=reference, use_cache=True).logits
    assert torch.allclose(got, want, atol=1e-5)

    cache.batch_select_indices(torch.tensor([1]))
    single = GEARCache(config, config=model.config)
    decode_logits(model, single, tokens[:1, :51], prefill=40)
    with torch.inference_mode():
        got = model(tokens[:1, 51:52], cache=cache, use_cache=True).logits
        want = model(tokens[:1, 51:52], cache=single, use_cache=True).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_unsupported_uses_raise_clear_errors(model) -> None:
    sliding = MistralConfig(
        num_hidden_layers=2,
        sliding_window=16,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    with pytest.raises(ValueError, match="full-attention"):
        GEARCache(GEARConfig(), config=sliding)
    with pytest.raises(ValueError, match="GEARConfig"):
        GEARCache({"bits": 4})
    layer = GEARLayer(GEARConfig())
    with pytest.raises(ValueError, match="negative count"):
        layer.crop(3)
    with pytest.raises(ValueError, match="equal shape"):
        layer.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="compresses"):
        GEARLayer(GEARConfig(bits=None))


def layer_states(seed: int, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, tokens, 8, generator=g), torch.randn(
        batch, 2, tokens, 8, generator=g
    )


# Keys after RoPE (a head dimension of 8, frequencies 1 … 1/1000) or as they are.
ROTATIONS = {"post-RoPE": None, "pre-RoPE": KeyRotation(1000.0 ** -torch.arange(0, 1, 0.25))}
rotations = pytest.mark.parametrize("rotation", list(ROTATIONS.values()), ids=list(ROTATIONS))


def new_layer(config: GEARConfig, rotation: KeyRotation | None) -> GEARLayer:
    """A layer of ``config``, compressing keys before ``rotation`` when one is given."""
    if rotation is None:
        return GEARLayer(config)
    return GEARLayer(dataclasses.replace(config, key_rope="pre"), rotation)


def held(layer: GEARLayer) -> list[torch.Tensor]:
    return [t for stream in layer.streams for t in stream.tensors()]


@rotations
def test_crop_of_the_latest_states_is_exact(rotation: KeyRotation | None) -> None:
    config = small_config(bits=2, rank=2, outlier_ratio=0.05)
    keys, values = layer_states(3, 2, 45)
    cropped, fresh = new_layer(config, rotation), new_layer(config, rotation)
    cropped.update(keys[..., :30, :], values[..., :30, :])
    cropped.update(keys[..., 30:40, :], values[..., 30:40, :])  # compresses one block first
    cropped.crop(-7)  # as assisted decoding rejects 7 of 10 candidates
    fresh.update(keys[..., :30, :], values[..., :30, :])
    fresh.update(keys[..., 30:33, :], values[..., 30:33, :])
    assert cropped.get_seq_length() == fresh.get_seq_length() == 33
    assert all(torch.equal(a, b) for a, b in zip(held(cropped), held(fresh), strict=True))
    got = cropped.update(keys[..., 40:45, :], values[..., 40:45, :])
    want = fresh.update(keys[..., 40:45, :], values[..., 40:45, :])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@rotations
def test_crop_into_compressed_blocks_keeps_what_was_read(rotation: KeyRotation | None) -> None:
    config = small_config(bits=4, rank=2, outlier_ratio=0.02)
    keys, values = layer_states(4, 2, 60)
    layer = new_layer(config, rotation)
    layer.update(keys[..., :40, :], values[..., :40, :])
    read_keys, read_values = layer.update(keys[..., 40:41, :], values[..., 40:41, :])
    assert layer.streams[0].compressed_blocks == 2
    layer.crop(-20)  # 9 buffered tokens, then 11 of the second compressed block
    assert layer.get_seq_length() == 21 and layer.streams[0].compressed_blocks == 1
    new_keys, new_values = keys[..., 50:51, :], values[..., 50:51, :]
    got_keys, got_values = layer.update(new_keys, new_values)
    assert torch.equal(got_keys, torch.cat([read_keys[..., :21, :], new_keys], dim=-2))
    assert torch.equal(got_values, torch.cat([read_values[..., :21, :], new_values], dim=-2))
    layer.crop(-22)  # every token
    assert layer.get_seq_length() == 0 and layer.nbytes == 0
    assert torch.equal(layer.update(keys[..., :5, :], values[..., :5, :])[0], keys[..., :5, :])


def padded_positions(lengths: list[int], total: int) -> torch.Tensor:
    """``position_ids`` as ``generate`` sets them for left-padded rows of these lengths."""
    mask = torch.stack([torch.arange(total) >= total - n for n in lengths]).long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@rotations
def test_padding_stays_out_of_the_blocks_of_real_tokens(rotation: KeyRotation | None) -> None:
    config = small_config(bits=2, rank=2, outlier_ratio=0.05)
    keys, values = layer_states(5, 3, 60)
    lengths = [50, 29, 13]  # padding 0, 21 and 37: phases 0, 5, 5
    pads = [50 - n for n in lengths]
    keys[2, :, :37] = 1e3  # padding that would wreck any group it entered
    batch = new_layer(config, rotation)
    batch.update(
        keys[..., :50, :],
        values[..., :50, :],
        kwargs={"position_ids": padded_positions(lengths, 50)},
    )
    assert batch.padding.tolist() == pads and [s.phase for s in batch.streams] == [0, 5]
    for step in range(50, 60):
        position = torch.tensor([[n + step - 50] for n in lengths])
        got = batch.update(
            keys[..., step : step + 1, :],
            values[..., step : step + 1, :],
            kwargs={"position_ids": position},
        )
    for row, pad in enumerate(pads):
        alone = new_layer(config, rotation)
        alone.update(keys[row : row + 1, :, pad:50], values[row : row + 1, :, pad:50])
        for step in range(50, 60):
            want = alone.update(
                keys[row : row + 1, :, step : step + 1], values[row : row + 1, :, step : step + 1]
            )
        for got_part, want_part in zip(got, want, strict=True):
            assert torch.allclose(got_part[row : row + 1, :, pad:], want_part, atol=1e-6)


@rotations
def test_batch_operations_move_rows_between_phase_groups(rotation: KeyRotation | None) -> None:
    config = small_config(bits=4, rank=1)
    keys, values = layer_states(6, 3, 40)
    lengths = [40, 30, 40]
    positions = padded_positions(lengths, 40)
    layer = new_layer(config, rotation)
    layer.update(keys[..., :36, :], values[..., :36, :], kwargs={"position_ids": positions[:, :36]})
    layer.update(keys[..., 36:37, :], values[..., 36:37, :])
    order = torch.tensor([1, 0, 1, 2])  # select, repeat and swap rows of both phases
    reference = new_layer(config, rotation)
    reference.update(
        keys[order, :, :36], values[order, :, :36], kwargs={"position_ids": positions[order, :36]}
    )
    reference.update(keys[order, :, 36:37], values[order, :, 36:37])
    layer.select_rows(order)
    assert layer.padding.tolist() == [10, 0, 10, 0]
    got = layer.update(keys[order, :, 37:38], values[order, :, 37:38])
    want = reference.update(keys[order, :, 37:38], values[order, :, 37:38])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_deepcopy_and_reset_of_a_model_cache(model, tokens) -> None:
    cache = GEARCache(small_config(bits=4, rank=2), config=model.config)
    decode_logits(model, cache, tokens[:, :50], prefill=40)
    twin = copy.deepcopy(cache)
    step = tokens[:, 50:51]
    with torch.inference_mode():
        first = model(step, cache=cache, use_cache=True).logits
        second = model(step, cache=twin, use_cache=True).logits
    assert torch.equal(first, second) and cache.nbytes == twin.nbytes
    fresh = GEARCache(small_config(bits=4, rank=2), config=model.config)
    fresh_logits = decode_logits(model, fresh, tokens, 40)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    assert torch.equal(decode_logits(model, cache, tokens, prefill=40), fresh_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decompression_steps_match_the_torch_path(model, tokens, monkeypatch, dtype):
    """Decoding through the fused CPU kernel gives the logits of the torch decompression path
    (``SKETCHCOMM_KERNELS=numpy``) to float rounding, at 4 bits (float16 metadata) and 3 bits
    (8-bit metadata) with the low-rank term."""
    pytest.importorskip("numba")
    model = copy.deepcopy(model).to(dtype)
    configs = (
        small_config(bits=4, rank=1, metadata="float16"),
        small_config(bits=3, rank=2, outlier_ratio=0.02),
    )
    for config in configs:
        monkeypatch.delenv("SKETCHCOMM_KERNELS", raising=False)
        compiled = decode_logits(model, GEARCache(config, config=model.config), tokens, 40)
        monkeypatch.setenv("SKETCHCOMM_KERNELS", "numpy")
        reference = decode_logits(model, GEARCache(config, config=model.config), tokens, 40)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        assert (compiled.float() - reference.float()).abs().max().item() < tolerance


@rotations
def test_decoded_buffer_returns_what_decompression_returns(rotation: KeyRotation | None) -> None:
    """``decoded_buffer=True`` keeps each block decompressed once; every step, crop and row
    selection reads back exactly what decompressing the blocks again gives."""
    config = small_config(bits=2, rank=1, outlier_ratio=0.05, outlier_scope="row")
    keys, values = layer_states(3, 2, 90)
    plain = new_layer(config, rotation)
    kept = new_layer(dataclasses.replace(config, decoded_buffer=True), rotation)
    for layer in (plain, kept):
        layer.update(keys[..., :40, :], values[..., :40, :])
    for start, stop in ((40, 41), (41, 60), (60, 61), (61, 70)):
        got = kept.update(keys[..., start:stop, :], values[..., start:stop, :])
        want = plain.update(keys[..., start:stop, :], values[..., start:stop, :])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    stream = kept.streams[0]
    assert stream.compressed_blocks == 3
    decoded = stream.decoded_keys.numel() * stream.decoded_keys.element_size() * 2
    assert kept.nbytes == plain.nbytes + decoded
    for layer in (plain, kept):
        layer.crop(-25)  # into the compressed blocks
        layer.select_rows(torch.tensor([1, 0, 0]))  # beam-search style: rows copied
    rows = torch.tensor([1, 0, 0])
    got = kept.update(keys[rows, :, 80:82], values[rows, :, 80:82])
    want = plain.update(keys[rows, :, 80:82], values[rows, :, 80:82])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert kept.streams[0].decoded_keys.shape[-2] == 16 * kept.streams[0].compressed_blocks


def test_per_row_outliers_and_value_groups_come_back_exactly() -> None:
    """Outliers picked per channel of the keys and per token of the values are restored bit
    for bit; a separate value group size sets the values' scale count."""
    keys, values = layer_states(1, 2, 64)
    config = GEARConfig(
        bits=2,
        rank=0,
        outlier_ratio=0.25,  # 8 per side in a channel of 64 tokens, 1 in a token of 8 channels
        outlier_scope="row",
        corrected="both",
        group_size=16,
        value_group_size=4,
        buffer_size=16,
    )
    for states, kind, axis in ((keys, "key", -2), (values, "value", -1)):
        stored = compress(states, config, kind)
        restored = stored.decompress()
        top = states.argmax(dim=axis, keepdim=True)  # each row's largest entry is an outlier
        assert torch.equal(restored.gather(axis, top), states.gather(axis, top))
        assert stored.outlier_index.dtype == torch.uint8
    assert compress(values, config, "value").quantized.scale.shape[-1] == 8 // 4
