"""GEAR compression of the KV cache of transformer language models.

GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM", arXiv:2403.05527) stores each key or value matrix as
``X ≈ D̂ + L + S``: low-bit group quantization ``D̂`` (keys per channel, values per token, after
KIVI, Liu et al., 2024, arXiv:2402.02750), a low-rank ``L`` of the quantization residual found
by power iteration, and the outliers ``S`` kept exactly.

* [`GEARConfig`][sketchcomm.gear.GEARConfig] — the settings;
  [`compress()`][sketchcomm.gear.compress] / [`CompressedTensor`][sketchcomm.gear.CompressedTensor]
  — one tensor.
* [`GEARCache`][sketchcomm.gear.GEARCache] — a transformers ``Cache`` for ``generate`` and decoding
  loops;
  [`cache_nbytes()`][sketchcomm.gear.cache_nbytes] — the bytes a cache holds.
* [`generation_eval()`][sketchcomm.gear.generation_eval] — a quick greedy-generation check, e.g.
  during training.

Internals stay importable from their modules (``sketchcomm.gear.quantization``, ``.lowrank``,
``.memory``, ``.generation``, ``.cache``, ``.loading``, ``.rope``). The evaluation against
``DynamicCache``, quantization only and transformers' quanto cache (perplexity, KL, agreement,
bytes and speed) is a benchmark of the repository: ``sketchcomm bench gear``
(``benchmarks/gear.py``).

The names below are imported lazily, on first access, so that ``import sketchcomm.gear`` does
not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import GEARConfig

_LAZY = {
    "GEARCache": "cache",
    "CompressedTensor": "compression",
    "compress": "compression",
    "generation_eval": "generation",
    "cache_nbytes": "memory",
}

__all__ = ["GEARConfig", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
