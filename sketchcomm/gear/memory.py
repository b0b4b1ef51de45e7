"""Byte accounting of KV caches: every byte a cache holds, metadata included.

Works for ``DynamicCache``, [`GEARCache`][sketchcomm.gear.cache.GEARCache] and transformers'
``QuantizedCache`` (whose quantized states are tensor subclasses, such as optimum-quanto's
``WeightQBitsTensor``, made of inner tensors that are counted one by one).
"""

from __future__ import annotations

from typing import Any

import torch


def held_nbytes(obj: Any) -> int:
    """Bytes of the tensors reachable from ``obj`` (a tensor, tensor subclass, list, tuple, dict).

    A tensor subclass that implements ``__tensor_flatten__`` is counted through its inner tensors
    (packed data, scales, shifts), not through its logical shape.
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_nbytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(held_nbytes(v) for v in obj)
    return 0


def cache_nbytes(cache: Any) -> int:
    """Bytes held by all layers of a transformers ``Cache``.

    Counts a layer's full-precision ``keys`` and ``values`` (the whole states of a dynamic layer,
    the residual buffer of a quantized one), its quantized states (``_quantized_keys`` and
    ``_quantized_values`` of transformers' quantized layers) and, for GEAR layers, their
    compressed blocks.
    """
    from .cache import GEARLayer

    total = 0
    for layer in cache.layers:
        if isinstance(layer, GEARLayer):
            total += layer.nbytes
            continue
        if not getattr(layer, "is_initialized", False):
            continue
        total += held_nbytes([layer.keys, layer.values])
        total += held_nbytes(
            [getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)]
        )
    return total


def float16_nbytes(cache: Any) -> int:
    """Bytes the cached keys and values would take uncompressed in float16.

    Computed from the states of an uncompressed (``DynamicCache``) cache: 2 bytes per entry.
    """
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)
