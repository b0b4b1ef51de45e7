"""Does a cheaper low-rank term pay for its bytes? GEAR's ``L`` with one channel basis per head.

GEAR's low-rank term stores, for every ``[n, d]`` block, ``A ∈ R^{n×r}`` and ``B ∈ R^{d×r}`` in
float16: ``16 r (1/n + 1/d)`` bits per entry, 0.75 bit at rank 1 for blocks of 32 × 64. The
quantization residual of the keys concentrates on a few channels of each head, which stay the
same from block to block, so this variant fits ``B`` once per layer and head (the top-``r``
right singular vectors of the prompt's residual, float16) and stores only ``A = R B`` per block
(float16): ``16 r / d`` bits per entry, 0.25 bit at rank 1. Causal as the cache is: ``B`` comes
from the blocks of the prompt, and later blocks are projected onto it.

``python -m benchmarks.gear_lowrank --text docstrings --segments 4`` compares, by the one-pass
computation of [`benchmarks.gear_simulate`][benchmarks.gear_simulate], quantization only with
key groups of 32 and 16 tokens, GEAR's per-block rank 1 and the shared basis at ranks 1, 2 and
4, at 2 and 4 bits (the keys only are corrected, as in the default recipe), all with keys
compressed after RoPE.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from benchmarks.gear_frontier import TEXTS, block_compressor
from benchmarks.gear_simulate import simulate
from sketchcomm.gear.compression import compress
from sketchcomm.gear.config import GEARConfig


def shared_basis_compressor(config: GEARConfig, rank: int, prompt_blocks: int):
    """A :data:`benchmarks.gear_simulate.CompressBlocks`: ``config``'s quantization, plus, for
    the keys, the residual projected on a per-head basis fitted on the first ``prompt_blocks``
    blocks (module docstring)."""
    quant = config.quantization_only()

    def compress_blocks(blocks: torch.Tensor, kind: str, layer: int):
        if blocks.numel() == 0:
            return blocks, 0
        stored = compress(blocks, quant, kind)
        approx, nbytes = stored.decompress().float(), stored.nbytes
        if kind == "key":
            residual = blocks.float() - approx  # [batch, heads, blocks, n, d]
            batch, heads, d = residual.shape[0], residual.shape[1], residual.shape[-1]
            fit = residual[:, :, :prompt_blocks].reshape(batch, heads, -1, d)
            basis = torch.linalg.eigh(fit.transpose(-1, -2) @ fit).eigenvectors[..., -rank:]
            basis = basis.half().float()  # [batch, heads, d, r]
            factor = torch.einsum("bhknd,bhdr->bhknr", residual, basis).half().float()
            approx = approx + torch.einsum("bhknr,bhdr->bhknd", factor, basis)
            nbytes += 2 * (factor.numel() + basis.numel())
        return approx.to(blocks.dtype), nbytes

    return compress_blocks


def main(argv: Sequence[str] | None = None) -> int:
    from sketchcomm.gear.loading import load_model, text_segments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", choices=sorted(TEXTS), default="docstrings")
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(None, None, "float32")
    ids = text_segments(
        tokenizer, TEXTS[args.text](), args.segments, args.prefill + args.tokens + 1
    )
    reference = simulate(model, ids, args.prefill, 64, block_compressor(None, None)).perplexity
    print("| bits | method | Δ ppl | ×fp16 |\n|---|---|---|---|")
    for bits in (2, 4):
        gear = GEARConfig(bits=bits, key_rope="post")  # the basis is fitted on cached keys
        quant = gear.quantization_only()
        runs = {
            "quant-only g32": block_compressor(quant, model.config),
            "quant-only g16": block_compressor(
                dataclasses.replace(quant, group_size=16), model.config
            ),
            "GEAR rank 1 per block": block_compressor(gear, model.config),
        }
        for rank in (1, 2, 4):
            runs[f"shared basis rank {rank}"] = shared_basis_compressor(
                gear, rank, args.prefill // gear.buffer_size
            )
        for name, compress_blocks in runs.items():
            run = simulate(model, ids, args.prefill, gear.buffer_size, compress_blocks)
            change = 100 * (run.perplexity / reference - 1)
            print(f"| {bits} | {name} | {change:+.2f} % | {run.compression:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
