"""GPT-2 with tied weights under DDP on 2 gloo ranks, sigma = 0: every bucket's released sum
equals the one-process reference built from torch.func per-example gradients of the whole model,
sketched with the bucket's sketch and clipped in sketch space."""

from __future__ import annotations

import torch
from distributed import run_ranks
from private_reference import gpt2, private_worker, reference_release

GPT2 = {
    "model": "gpt2",
    "size": 3,
    "micro": 1,
    "clip": 1.0,
    "compression": 4,
    "min_compression_size": 2000,
    "bucket_cap_mb": 0.02,
}


def test_gpt2_release_equals_the_torch_func_reference() -> None:
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    spec = {**GPT2, "steps": 4}  # DDP rebuilds its buckets after step 0; streaming by step 3
    results = run_ranks(private_worker, 2, spec)
    assert [r["ledger_steps"] for r in results] == [4, 4]
    assert [s["streaming"] for s in results[0]["steps"]] == [False, False, False, True]
    for step in range(4):
        reference = reference_release(spec, results[0]["steps"][step], step, 2)
        per_rank = [r["steps"][step]["released"] for r in results]
        released = [sum(tables) for tables in zip(*per_rank, strict=True)]
        assert len(released) == len(reference)
        assert sum(r.shape[0] > 1 for r in reference) > (step > 0)  # several real sketches
        unclipped = reference_release(spec, results[0]["steps"][step], step, 2, clipped=False)
        assert any(
            (u - r).norm() > 0.1 * r.norm() for u, r in zip(unclipped, reference, strict=True)
        )
        for got, expected in zip(released, reference, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
