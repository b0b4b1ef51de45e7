"""Decoding cost of KV caches: time per step and peak memory, one fresh process per cache.

A process loads the model, builds one cache, prefills ``B`` segments of ``P`` tokens and decodes
``N`` steps (teacher-forced), and reports the median wall time of a step, the bytes the cache
holds at the end and the process's peak resident memory (``ru_maxrss``). With one thread the
process's CPU time of a step (``cpu ms/step``) is also reported: on a machine shared with other
jobs it is steadier than the wall time, which counts the time the process waited for a core.
Peak memory includes the model and every temporary of the steps (decompressed keys and values,
attention), which ``nbytes`` alone does not show; running each cache in a fresh interpreter
keeps one cache's peak from hiding another's. ``peak - model`` subtracts the peak of a process
that only loads the model and runs the same prefill without keeping a cache.

Run ``python -m benchmarks.gear_cost CACHE`` for one measurement (JSON on stdout), or
:func:`measure_all` for every cache, each in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CACHES = {
    "dynamic": "DynamicCache",
    "gear4": "GEAR 4-bit (default recipe), decompressed chunk by chunk every step",
    "gear4-decoded": "GEAR 4-bit (default recipe) with decoded_buffer=True",
    "quant4": "quantization only, 4-bit (default recipe without the low-rank term)",
    "gear4-m16": "GEAR 4-bit (default recipe) with metadata='float16' (the former default)",
    "gear2": "GEAR 2-bit (default recipe)",
    "gear4-post": "GEAR 4-bit (default recipe) with key_rope='post' (keys after RoPE)",
    "quant4-post": "quantization only, 4-bit, with key_rope='post'",
    "quanto4": "transformers QuantizedCache(backend='quanto', nbits=4)",
    "none": "no cache kept: the model and one prefill (the memory baseline)",
}


def make_cache(name: str, model):
    """The cache called ``name`` (see :data:`CACHES`) for ``model``."""
    import dataclasses

    from transformers import DynamicCache, QuantizedCache

    from sketchcomm.gear import GEARCache, GEARConfig

    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "quanto4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    recipe = GEARConfig(bits=2 if name == "gear2" else 4)
    if name == "gear4-decoded":
        recipe = dataclasses.replace(recipe, decoded_buffer=True)
    if name == "gear4-m16":
        recipe = dataclasses.replace(recipe, metadata="float16")
    if name.endswith("-post"):
        recipe = dataclasses.replace(recipe, key_rope="post")
    if name.startswith("quant4"):
        recipe = recipe.quantization_only()
    return GEARCache(recipe, config=model.config)


def measure(name: str, batch: int, prefill: int, steps: int, dtype: str) -> dict:
    """Time and memory of one cache, in this process (see the module docstring)."""
    import torch

    from sketchcomm.gear.loading import default_text, load_model, text_segments
    from sketchcomm.gear.memory import cache_nbytes

    model, tokenizer = load_model(dtype=dtype)
    ids = text_segments(tokenizer, default_text(), batch, prefill + steps + 1, offset=0)
    times, cpu_times = [], []
    with torch.inference_mode():
        if name == "none":
            model(ids[:, :prefill], use_cache=False)
            held = 0
        else:
            cache = make_cache(name, model)
            model(ids[:, :prefill], cache=cache, use_cache=True)
            for i in range(steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                model(ids[:, prefill + i : prefill + i + 1], cache=cache, use_cache=True)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
            held = cache_nbytes(cache)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {
        "cache": name,
        "ms_per_step": 1000 * statistics.median(times) if times else None,
        "cpu_ms_per_step": 1000 * statistics.median(cpu_times) if cpu_times else None,
        "held_bytes": held,
        "peak_rss_bytes": peak,
        "batch": batch,
        "prefill": prefill,
        "steps": steps,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
    }


def measure_all(
    names: list[str], batch: int, prefill: int, steps: int, dtype: str, threads: int
) -> list[dict]:
    """:func:`measure` for every cache of ``names``, each in a fresh subprocess."""
    results = []
    for name in ["none", *names]:
        command = [sys.executable, "-m", "benchmarks.gear_cost", name]
        command += ["--batch", str(batch), "--prefill", str(prefill), "--steps", str(steps)]
        command += ["--dtype", dtype, "--threads", str(threads)]
        done = subprocess.run(
            command, capture_output=True, text=True, check=True, env=dict(os.environ)
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]}", file=sys.stderr, flush=True)
    return results


def markdown_cost(results: list[dict]) -> str:
    """A Markdown table of :func:`measure_all`'s results, against the first cache after
    ``none`` (DynamicCache when listed first)."""
    baseline = next(r for r in results if r["cache"] == "none")
    caches = [r for r in results if r["cache"] != "none"]
    reference = caches[0]
    lines = [
        "| cache | ms/step | vs first | cpu ms/step | vs first | KV bytes held | peak RSS (MiB) "
        "| peak − model (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in caches:
        lines.append(
            f"| {CACHES[r['cache']]} | {r['ms_per_step']:.1f} "
            f"| {r['ms_per_step'] / reference['ms_per_step']:.2f}× "
            f"| {r['cpu_ms_per_step']:.1f} "
            f"| {r['cpu_ms_per_step'] / reference['cpu_ms_per_step']:.2f}× | {r['held_bytes']:,} "
            f"| {r['peak_rss_bytes'] / mib:.0f} "
            f"| {(r['peak_rss_bytes'] - baseline['peak_rss_bytes']) / mib:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure one cache and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache", choices=sorted(CACHES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.cache, args.batch, args.prefill, args.steps, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
