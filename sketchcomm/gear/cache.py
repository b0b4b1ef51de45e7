"""``GEARCache``: a transformers ``Cache`` whose layers hold GEAR-compressed keys and values.

Each [`GEARLayer`][sketchcomm.gear.cache.GEARLayer] keeps, for its keys and for its values and
for each group of batch rows that share block boundaries (a
[`BlockStream`][sketchcomm.gear.stream.BlockStream]),

* a full-precision **buffer** of the most recent tokens, ``[rows, kv_heads, t_b, head_dim]`` in
  the model's dtype: fewer than ``n_b`` (``n_b = buffer_size``) tokens plus those of the latest
  call;
* the **compressed** older tokens: ``c`` blocks of ``n_b`` tokens, stored as one
  [`CompressedTensor`][sketchcomm.gear.compression.CompressedTensor] of shape ``[rows, kv_heads, c,
  n_b, head_dim]`` (every ``[n_b, head_dim]`` block of every head is compressed on its own).

``update`` first compresses the buffer's whole blocks (the streaming strategy of GEAR, Kang et
al., 2024), then returns the decompressed blocks, the buffer and the new states (exact), in the
model's dtype, and appends the new states to the buffer. The prompt is thus attended exactly
during the prefill and through its compressed form afterwards, and the states of the latest call
can be cropped exactly (assisted and prompt-lookup decoding). Nothing is kept decompressed
between steps, so the memory held is what
[`GEARLayer.nbytes`][sketchcomm.gear.cache.GEARLayer.nbytes] reports.

**Padding.** A left-padded row's blocks start at its first real token (the rows of a batch are
grouped by their padding modulo ``n_b``, and the padding is stored as zeros outside any block of
real tokens), so padding never enters a quantization group, a low-rank factor or an outlier
selection, and each row is compressed as it is when run alone. The padding is read from the
``position_ids`` that the model's attention layers pass to the cache, as ``generate`` sets them
from the attention mask; a decoding loop over a left-padded batch must pass ``position_ids`` too
(the model's positions are wrong without them anyway).

With compression disabled (``GEARConfig(bits=None)`` or ``enabled=False``) the layers are plain
``DynamicLayer`` objects, laid out as ``DynamicCache`` would lay them out, so the cache behaves
exactly like ``DynamicCache``.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs
from transformers.configuration_utils import PreTrainedConfig

from .config import GEARConfig
from .rope import KeyRotation, check_rotation, rotation_for
from .stream import BlockStream


class GEARLayer(DynamicLayer):
    """One attention layer's cache, compressed with GEAR (see the module docstring).

    The batch rows are split by their phase (left padding modulo ``n_b``) into
    [`BlockStream`][sketchcomm.gear.stream.BlockStream] objects, one per phase present; without
    padding there is one stream holding every row.

    Args:
        config: the GEAR settings; they must compress.
        rotation: the model's RoPE to undo on the keys before compression (see
            [`rotation_for()`][sketchcomm.gear.rope.rotation_for]); needed for
            ``key_rope="pre"``.
    """

    is_croppable = True

    def __init__(self, config: GEARConfig, rotation: KeyRotation | None = None):
        super().__init__()
        if not config.compresses:
            raise ValueError("GEARLayer needs a config that compresses; use DynamicLayer otherwise")
        check_rotation(config, rotation)
        self.config = config
        self.rotation = rotation
        self.cumulative_length = 0
        self.streams: list[BlockStream] = []
        self.rows: list[torch.Tensor] = []
        self.padding: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype and device."""
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add states ``[batch, kv_heads, q, head_dim]``; return ``[batch, kv_heads, T, head_dim]``.

        The returned keys and values are, along the sequence, the decompressed blocks, the
        buffer and the new states, in the model's dtype (the first call returns its states).
        The ``position_ids`` that transformers' attention layers pass along (in ``kwargs``) give
        each row's left padding on the first call; without them no row is padded.
        """
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                "GEARLayer expects keys and values of equal shape [batch, kv_heads, seq, "
                f"head_dim], got {tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.streams:
            self._start(key_states, value_states, left_padding(key_states, args, kwargs))
            return key_states, value_states
        self.cumulative_length += key_states.shape[-2]
        if len(self.streams) == 1:
            return self.streams[0].update(key_states, value_states)
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.cumulative_length, head_dim)
        keys = key_states.new_empty(shape)
        values = value_states.new_empty(shape)
        for stream, rows in zip(self.streams, self.rows, strict=True):
            keys[rows], values[rows] = stream.update(key_states[rows], value_states[rows])
        return keys, values

    def _start(
        self, key_states: torch.Tensor, value_states: torch.Tensor, padding: torch.Tensor
    ) -> None:
        """Open one stream per phase of the rows' left padding."""
        self.cumulative_length = key_states.shape[-2]
        self.padding = padding
        phases = padding % self.config.buffer_size
        for phase in phases.unique().tolist():
            rows = (phases == phase).nonzero().flatten()
            keys, values = key_states[rows], value_states[rows]
            self.streams.append(
                BlockStream(self.config, phase, keys, values, padding[rows], self.rotation)
            )
            self.rows.append(rows)

    def get_seq_length(self) -> int:
        """Number of tokens cached (compressed and buffered)."""
        return self.cumulative_length

    @property
    def nbytes(self) -> int:
        """Bytes held by every stream: buffers and every tensor of the compressed blocks."""
        return sum(stream.nbytes for stream in self.streams)

    def select_rows(self, source: torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``source[i]`` (exact: it moves stored rows)."""
        if not self.streams:
            return
        source = source.to(self.padding.device).long()
        owner = torch.empty_like(self.padding)
        local = torch.empty_like(self.padding)
        for index, rows in enumerate(self.rows):
            owner[rows] = index
            local[rows] = torch.arange(rows.numel(), device=rows.device)
        streams, new_rows = [], []
        for index, stream in enumerate(self.streams):
            taken = (owner[source] == index).nonzero().flatten()
            if taken.numel():
                picked = local[source[taken]]
                stream.apply(lambda t, picked=picked: t.index_select(0, picked.to(t.device)))
                streams.append(stream)
                new_rows.append(taken)
        self.streams, self.rows, self.padding = streams, new_rows, self.padding[source]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search: row ``i`` becomes row ``beam_idx[i]``."""
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch entry ``repeats`` times."""
        if self.streams:
            self.select_rows(
                torch.arange(self.padding.numel(), device=self.padding.device).repeat_interleave(
                    repeats
                )
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch entries ``indices``."""
        if self.streams:
            all_rows = torch.arange(self.padding.numel(), device=self.padding.device)
            self.select_rows(all_rows[indices.to(self.padding.device)])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer``).

        Exact when they are still in the buffer, which holds at least the states of the latest
        ``update``: the layer is then as if they had never been added. Removing more
        decompresses the last blocks needed back into the buffer (see
        [`BlockStream.crop()`][sketchcomm.gear.stream.BlockStream.crop]); removing every token
        empties the layer.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes minus the number of tokens to remove, got {tokens_to_remove}; "
                "pass a negative count, as for DynamicLayer"
            )
        count = -tokens_to_remove
        if count == 0 or not self.streams:
            return
        if count >= self.cumulative_length:
            self.reset()
            return
        deepest = max(stream.phase for stream in self.streams)
        if count > self.cumulative_length - deepest:
            raise ValueError(
                f"cannot remove {count} of {self.cumulative_length} tokens: that reaches into "
                f"the left padding ({deepest} positions) of some rows; remove at most "
                f"{self.cumulative_length - deepest}, or every token"
            )
        for stream in self.streams:
            stream.crop(count)
        self.cumulative_length -= count

    def reset(self) -> None:
        """Drop every stored state."""
        super().reset()
        self.cumulative_length = 0
        self.streams, self.rows, self.padding = [], [], None


def left_padding(states: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Left-padding positions of every row, ``[batch]``, from the ``position_ids`` passed along.

    ``generate`` numbers the tokens of a left-padded row from 0 at its first real token, so a row
    of ``q`` states whose positions end at ``P`` and count up from 0 over its last ``P + 1``
    states has ``q - P - 1`` padding positions. Rows without such positions (or without
    ``position_ids``) count as unpadded.
    """
    batch, _, length, _ = states.shape
    none = torch.zeros(batch, dtype=torch.long, device=states.device)
    found = [kwargs, kwargs.get("kwargs"), kwargs.get("cache_kwargs"), *args]
    positions = next(
        (d["position_ids"] for d in found if isinstance(d, dict) and "position_ids" in d), None
    )
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        return none
    if positions.shape[-1] != length or positions.shape[0] not in (1, batch):
        return none
    positions = positions.to(states.device).long().expand(batch, length)
    padding = (length - 1 - positions[:, -1]).clamp(0, length)
    counted = torch.arange(length, device=states.device)[None, :] - padding[:, None]
    real = counted >= 0
    consistent = ((positions == counted) | ~real).all(dim=1)
    return torch.where(consistent, padding, none)


class GEARCache(Cache):
    """A transformers ``Cache`` compressing keys and values with GEAR.

    Use it like ``DynamicCache``: ``model.generate(..., past_key_values=GEARCache(gear_config,
    config=model.config))`` (``cache=`` is the current name of that argument in transformers),
    or ``model(input_ids, cache=cache, use_cache=True)`` in a decoding loop.

    Args:
        gear_config: the GEAR settings (defaults to ``GEARConfig()``). When they do not compress,
            the cache is laid out and behaves exactly like ``DynamicCache(config=config)``.
        config: the model's config (optional). With it every layer is created up front (layer
            ``i`` with ``gear_config.for_layer(i)``) and models with sliding-window or
            linear-attention layers are rejected when compressing; without it layers are created
            on first use (``per_layer`` overrides then need it).

    >>> import torch
    >>> from sketchcomm.gear import GEARCache, GEARConfig
    >>> cache = GEARCache(GEARConfig(bits=4, group_size=16, buffer_size=16))
    >>> keys = values = torch.randn(1, 2, 40, 16).half()  # [batch, kv heads, tokens, head dim]
    >>> k, v = cache.update(keys, values, layer_idx=0)  # the prefill, attended exactly
    >>> k, v = cache.update(keys[..., :1, :], values[..., :1, :], layer_idx=0)  # 2 blocks packed
    >>> k.shape, cache.get_seq_length()
    (torch.Size([1, 2, 41, 16]), 41)
    >>> cache.nbytes < 2 * keys.numel() * 2  # fewer bytes than float16 keys and values
    True
    >>> cache.crop(-1)  # the latest token, removed exactly
    >>> cache.get_seq_length()
    40
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
            for needs, field in (
                (gear_config.per_layer, "per_layer overrides"),
                (gear_config.key_rope == "pre", "key_rope='pre'"),
            ):
                if needs:
                    raise ValueError(
                        f"a GEARConfig with {field} needs the model's config: "
                        "GEARCache(gear_config, config=model.config)"
                    )
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
        beyond = [layer for layer, _ in gear_config.per_layer if layer >= len(layer_types)]
        if beyond:
            raise ValueError(
                f"per_layer names layers {beyond}, but the model has {len(layer_types)} layers"
            )
        rotation = rotation_for(gear_config, config)
        super().__init__(
            layers=[GEARLayer(gear_config.for_layer(i), rotation) for i in range(len(layer_types))]
        )

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
