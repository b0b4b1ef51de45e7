"""``GEARCache``: a transformers ``Cache`` whose layers hold GEAR-compressed keys and values.

Each [`GEARLayer`][sketchcomm.gear.cache.GEARLayer] keeps, for its keys and for its values,

* a full-precision **buffer** of the most recent tokens, ``[batch, kv_heads, t_b, head_dim]`` in
  the model's dtype with ``t_b < n_b`` (``n_b = buffer_size``), held in ``keys`` / ``values``
  as the residual states of transformers' quantized layers are;
* the **compressed** older tokens: ``c`` blocks of ``n_b`` tokens, stored as one
  [`CompressedTensor`][sketchcomm.gear.compression.CompressedTensor] of shape ``[batch, kv_heads, c,
  n_b, head_dim]`` (every ``[n_b, head_dim]`` block of every head is compressed on its own).

``update`` returns the decompressed blocks, then the buffer, then the new states (exact), cast to
the model's dtype; then the new states join the buffer and, once the buffer holds ``n_b`` or more
tokens, its oldest whole blocks are compressed (the streaming strategy of GEAR, Kang et al.,
2024). The prompt is thus attended exactly during the prefill and through its compressed form
afterwards. Nothing is kept decompressed between steps, so the memory held is what
[`GEARLayer.nbytes`][sketchcomm.gear.cache.GEARLayer.nbytes] reports.

With compression disabled (``GEARConfig(bits=None)`` or ``enabled=False``) the layers are plain
``DynamicLayer`` objects, laid out as ``DynamicCache`` would lay them out, so the cache behaves
exactly like ``DynamicCache``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs
from transformers.configuration_utils import PreTrainedConfig

from .compression import CompressedTensor, compress
from .config import GEARConfig


class GEARLayer(DynamicLayer):
    """One attention layer's cache, compressed with GEAR (see the module docstring).

    Args:
        config: the GEAR settings; they must compress.
    """

    is_croppable = False

    def __init__(self, config: GEARConfig):
        super().__init__()
        if not config.compresses:
            raise ValueError("GEARLayer needs a config that compresses; use DynamicLayer otherwise")
        self.config = config
        self.cumulative_length = 0
        self.compressed_keys: CompressedTensor | None = None
        self.compressed_values: CompressedTensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype and device and start with an empty buffer shaped like the states."""
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add states ``[batch, kv_heads, q, head_dim]``; return ``[batch, kv_heads, T, head_dim]``.

        The returned keys and values are, along the sequence, the decompressed blocks, the
        buffer and the new states, in the model's dtype.
        """
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                "GEARLayer expects keys and values of equal shape [batch, kv_heads, seq, "
                f"head_dim], got {tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]

        keys_out = self._assemble(self.compressed_keys, self.keys, key_states)
        values_out = self._assemble(self.compressed_values, self.values, value_states)

        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._compress_full_blocks()
        return keys_out, values_out

    def _assemble(
        self, stored: CompressedTensor | None, buffer: torch.Tensor, new: torch.Tensor
    ) -> torch.Tensor:
        """Decompressed blocks, buffer and new states, written into one tensor in sequence order."""
        batch, heads, _, head_dim = new.shape
        compressed = 0 if stored is None else stored.shape[2] * stored.shape[3]
        total = compressed + buffer.shape[-2] + new.shape[-2]
        out = torch.empty(batch, heads, total, head_dim, dtype=self.dtype, device=new.device)
        if stored is not None:
            stored.decompress(out=out[..., :compressed, :].view(stored.shape))
        out[..., compressed : compressed + buffer.shape[-2], :] = buffer
        out[..., compressed + buffer.shape[-2] :, :] = new
        return out

    def _compress_full_blocks(self) -> None:
        """Move the oldest whole blocks of ``n_b`` buffered tokens into the compressed store."""
        block = self.config.buffer_size
        blocks = self.keys.shape[-2] // block
        if blocks == 0:
            return
        batch, heads, _, head_dim = self.keys.shape
        count = blocks * block
        new_keys = compress(
            self.keys[..., :count, :].reshape(batch, heads, blocks, block, head_dim),
            self.config,
            "key",
        )
        new_values = compress(
            self.values[..., :count, :].reshape(batch, heads, blocks, block, head_dim),
            self.config,
            "value",
        )
        if self.compressed_keys is None:
            self.compressed_keys, self.compressed_values = new_keys, new_values
        else:
            self.compressed_keys = CompressedTensor.cat([self.compressed_keys, new_keys], dim=2)
            self.compressed_values = CompressedTensor.cat(
                [self.compressed_values, new_values], dim=2
            )
        # Cloned so that the buffer does not keep the storage of the compressed tokens alive.
        self.keys = self.keys[..., count:, :].clone()
        self.values = self.values[..., count:, :].clone()

    def get_seq_length(self) -> int:
        """Number of tokens cached (compressed and buffered)."""
        return self.cumulative_length

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffer plus every tensor of the compressed keys and values."""
        if not self.is_initialized:
            return 0
        total = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        if self.compressed_keys is not None:
            total += self.compressed_keys.nbytes + self.compressed_values.nbytes
        return total

    def _apply_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.compressed_keys is not None:
            self.compressed_keys = self.compressed_keys.apply(fn)
            self.compressed_values = self.compressed_values.apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (exact: it permutes stored rows)."""
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch entry ``repeats`` times."""
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch entries ``indices``."""
        self._apply_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported: compressed tokens cannot be removed exactly."""
        raise NotImplementedError("a GEAR cache cannot be cropped (is_croppable is False)")

    def reset(self) -> None:
        """Drop every stored state."""
        super().reset()
        self.cumulative_length = 0
        self.compressed_keys = self.compressed_values = None


class GEARCache(Cache):
    """A transformers ``Cache`` compressing keys and values with GEAR.

    Use it like ``DynamicCache``: ``model.generate(..., past_key_values=GEARCache(gear_config,
    config=model.config))`` (``cache=`` is the current name of that argument in transformers),
    or ``model(input_ids, cache=cache, use_cache=True)`` in a decoding loop.

    Args:
        gear_config: the GEAR settings (defaults to ``GEARConfig()``). When they do not compress,
            the cache is laid out and behaves exactly like ``DynamicCache(config=config)``.
        config: the model's config (optional). With it every layer is created up front and
            models with sliding-window or linear-attention layers are rejected when compressing;
            without it layers are created on first use.

    >>> import torch
    >>> from sketchcomm.gear import GEARCache, GEARConfig
    >>> cache = GEARCache(GEARConfig(bits=4, group_size=16, buffer_size=16))
    >>> keys = values = torch.randn(1, 2, 40, 16)  # [batch, kv heads, tokens, head dim]
    >>> k, v = cache.update(keys, values, layer_idx=0)
    >>> k.shape, cache.get_seq_length()
    (torch.Size([1, 2, 40, 16]), 40)
    >>> cache.nbytes < 2 * keys.numel() * 2  # fewer bytes than float16 keys and values
    True
    """

    def __init__(
        self, gear_config: GEARConfig | None = None, config: PreTrainedConfig | None = None
    ):
        gear_config = GEARConfig() if gear_config is None else gear_config
        if not isinstance(gear_config, GEARConfig):
            raise ValueError(f"gear_config must be a GEARConfig, got {type(gear_config).__name__}")
        self.gear_config = gear_config
        if not gear_config.compresses:
            if config is None:
                super().__init__(layer_class_to_replicate=DynamicLayer)
            else:
                super().__init__(layers=DynamicCache(config=config).layers)
            return
        if config is None:
            super().__init__(layer_class_to_replicate=functools.partial(GEARLayer, gear_config))
            return
        text_config = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(text_config)
        unsupported = set(layer_types) - {"full_attention"}
        if unsupported:
            raise ValueError(
                "GEARCache supports full-attention layers only; "
                f"the model has {sorted(unsupported)}"
            )
        super().__init__(layers=[GEARLayer(gear_config) for _ in layer_types])

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers: buffers, packed codes and all compression metadata."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, GEARLayer):
                total += layer.nbytes
            elif layer.is_initialized and layer.keys is not None:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
