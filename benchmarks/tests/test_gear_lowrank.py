"""The shared-basis low-rank variant of the low-rank study."""

from __future__ import annotations

import torch

from benchmarks.gear_lowrank import shared_basis_compressor
from sketchcomm.gear.compression import compress
from sketchcomm.gear.config import GEARConfig


def test_shared_basis_costs_a_quarter_bit_per_key_entry_and_lowers_the_error() -> None:
    g = torch.Generator().manual_seed(0)
    # Keys whose scale differs across channels: the residual concentrates on the wide ones.
    scales = torch.ones(64)
    scales[:3] = 20.0
    blocks = (torch.randn(1, 2, 6, 32, 64, generator=g) * scales).half()
    config = GEARConfig(bits=2, key_rope="post")
    quant = compress(blocks, config.quantization_only(), "key")
    decoded, nbytes = shared_basis_compressor(config, 1, prompt_blocks=4)(blocks, "key", 0)
    # A: one float16 per token and head; B: 64 float16 per head.
    assert nbytes == quant.nbytes + 2 * (2 * 6 * 32 + 2 * 64)
    error = (decoded.float() - blocks.float()).norm()
    assert error < 0.97 * (quant.decompress().float() - blocks.float()).norm()
    _, value_bytes = shared_basis_compressor(config, 1, 4)(blocks, "value", 0)
    assert value_bytes == compress(blocks, config.quantization_only(), "value").nbytes
