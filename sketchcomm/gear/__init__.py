"""GEAR compression of the KV cache of transformer language models.

GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM", arXiv:2403.05527) stores each key or value matrix as
``X ≈ D̂ + L + S``: low-bit group quantization ``D̂`` (keys per channel, values per token, after
KIVI, Liu et al., 2024, arXiv:2402.02750), a low-rank ``L`` of the quantization residual found
by power iteration, and the outliers ``S`` kept exactly.

* :class:`GEARConfig` — the settings; :func:`compress` / :class:`CompressedTensor` — one tensor.
* :class:`GEARCache` — a transformers ``Cache`` for ``generate`` and decoding loops.
* :func:`generation_eval` — a quick greedy-generation check, e.g. during training.
* :mod:`sketchcomm.gear.evaluate` and the ``gear-eval`` command — perplexity, KL, agreement,
  bytes and speed against ``DynamicCache``, quantization only and transformers' quanto cache.

The names below are imported lazily, on first access, so that importing
:mod:`sketchcomm.gear.cli` (for the command's ``--help``) does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import GEARConfig

_LAZY = {
    "GEARCache": "cache",
    "GEARLayer": "cache",
    "CompressedTensor": "compression",
    "compress": "compression",
    "GenerationReport": "generation",
    "generation_eval": "generation",
    "cache_nbytes": "memory",
    "float16_nbytes": "memory",
    "GroupQuantized": "quantization",
    "pack_codes": "quantization",
    "quantize": "quantization",
    "unpack_codes": "quantization",
}

__all__ = ["GEARConfig", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
