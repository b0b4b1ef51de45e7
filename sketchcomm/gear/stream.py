"""The streaming store of GEAR for batch rows that share block boundaries.

A [`BlockStream`][sketchcomm.gear.stream.BlockStream] holds, for ``b`` batch rows, keys and values
laid out along the sequence as

    [0, φ)                    φ leading positions, not stored (left padding, read back as zeros)
    [φ, φ + c n_b)            c compressed blocks of n_b tokens, every [n_b, head_dim] block of
                              every head compressed on its own
    [φ + c n_b, T)            the buffer: the most recent tokens, exact, in the model's dtype

where ``n_b`` is ``GEARConfig.buffer_size`` and ``φ`` (the phase) is the number of left-padding
positions of these rows modulo ``n_b``. A row with ``p = φ + m n_b`` padding positions thus starts
its tokens on a block boundary: its first ``m`` blocks hold only (zeroed) padding and no block
mixes padding with tokens, so padding never enters a quantization group, a low-rank factor or an
outlier selection, and every block of real tokens is compressed exactly as it is when the row is
run alone.

Compression is lazy by one call: [`update()`][sketchcomm.gear.stream.BlockStream.update] first
compresses the buffer's whole blocks, then returns the decompressed blocks, the buffer and the new
states, then appends the new states to the buffer. The states of the latest call are therefore
still exact in the buffer, so that [`crop()`][sketchcomm.gear.stream.BlockStream.crop] of up to
that many tokens (what assisted and prompt-lookup decoding remove) leaves the store exactly as if
they had never been added. The tokens attended are the same as with compression at the end of
each call: a block is compressed before any later call reads it either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .compression import CompressedTensor, compress, decompresses_in_place
from .config import GEARConfig
from .rope import KeyRotation, check_rotation

DECOMPRESS_CHUNK = 8
"""Blocks decompressed together when no decoded buffer is kept and the blocks cannot be written
straight into the result (see ``decompresses_in_place``)."""


class BlockStream:
    """GEAR's streaming store for ``b`` rows of one attention layer (see the module docstring).

    Args:
        config: the GEAR settings; they must compress.
        phase: ``φ``, leading positions of these rows that are not stored, ``0 <= φ < n_b``.
        key_states: the first keys ``[b, kv_heads, q, head_dim]`` (``q >= φ``), in the model's
            dtype.
        value_states: the first values, shaped like ``key_states``.
        padding: left-padding positions of every row, ``[b]``, each ``φ`` plus a multiple of
            ``n_b`` and at most ``q``; they are stored as zeros.
        rotation: the model's RoPE to undo on the keys (see
            [`rotation_for()`][sketchcomm.gear.rope.rotation_for]): keys are compressed before
            their rotation and rotated back when read, a row's token at sequence index ``i``
            being at position ``i - padding``.

    >>> import torch
    >>> from sketchcomm.gear import GEARConfig
    >>> from sketchcomm.gear.stream import BlockStream
    >>> config = GEARConfig(bits=4, group_size=16, buffer_size=16)
    >>> states = torch.randn(2, 1, 20, 8)  # row 0 has 4 positions of left padding, row 1 has 20
    >>> stream = BlockStream(config, 4, states, states, padding=torch.tensor([4, 20]))
    >>> keys, values = stream.update(states[..., :1, :], states[..., :1, :])
    >>> keys.shape, stream.compressed_blocks, stream.length
    (torch.Size([2, 1, 21, 8]), 1, 21)
    >>> bool(keys[1, :, :20].abs().max() < 1e-3)  # the padded row's padding reads back as zeros
    True
    """

    def __init__(
        self,
        config: GEARConfig,
        phase: int,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        padding: torch.Tensor,
        rotation: KeyRotation | None = None,
    ):
        if not config.compresses:
            raise ValueError("BlockStream needs a config that compresses")
        if not 0 <= phase < config.buffer_size or phase > key_states.shape[-2]:
            raise ValueError(
                f"phase must be in [0, buffer_size) and at most the tokens given, got {phase}"
            )
        check_rotation(config, rotation)
        self.config = config
        self.phase = phase
        self.rotation = rotation
        self.padding = padding.to(key_states.device).long().clone()
        self.dtype = key_states.dtype
        real = torch.arange(phase, key_states.shape[-2], device=key_states.device)
        real = (real[None, :] >= padding.to(key_states.device)[:, None])[:, None, :, None]
        self.keys = key_states[..., phase:, :] * real
        self.values = value_states[..., phase:, :] * real
        self.compressed_keys: CompressedTensor | None = None
        self.compressed_values: CompressedTensor | None = None
        # With config.decoded_buffer: the compressed blocks decompressed once, in the model's dtype.
        self.decoded_keys: torch.Tensor | None = None
        self.decoded_values: torch.Tensor | None = None

    @property
    def compressed_blocks(self) -> int:
        """Number ``c`` of compressed blocks."""
        return 0 if self.compressed_keys is None else self.compressed_keys.shape[2]

    @property
    def length(self) -> int:
        """Positions ``T = φ + c n_b + t_b`` covered (padding included)."""
        return self.phase + self.compressed_blocks * self.config.buffer_size + self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add states ``[b, kv_heads, q, head_dim]``; return ``[b, kv_heads, T + q, head_dim]``."""
        self.compress_full_blocks()
        keys = self._assemble(
            self.compressed_keys, self.decoded_keys, self.keys, key_states, self.rotation
        )
        values = self._assemble(
            self.compressed_values, self.decoded_values, self.values, value_states, None
        )
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return keys, values

    def _assemble(
        self,
        stored: CompressedTensor | None,
        decoded: torch.Tensor | None,
        buffer: torch.Tensor,
        new: torch.Tensor,
        rotation: KeyRotation | None,
    ) -> torch.Tensor:
        """Zeros, decompressed blocks, buffer and new states, in sequence order.

        The blocks come from ``decoded`` when it is kept, else they are decompressed straight
        into the result: all at once by the compiled kernel when the result is float32 on the
        CPU (no temporary at all), else ``DECOMPRESS_CHUNK`` blocks at a time, so that the
        float32 temporaries stay the size of a chunk, not of the cache. With a ``rotation``
        (pre-RoPE keys) the decompressed blocks are then rotated in place, ``DECOMPRESS_CHUNK``
        blocks at a time (in the model's dtype).
        """
        batch, heads, _, head_dim = new.shape
        start = self.phase
        compressed = 0 if stored is None else stored.shape[2] * stored.shape[3]
        out = torch.empty(
            batch, heads, self.length + new.shape[-2], head_dim, dtype=self.dtype, device=new.device
        )
        out[..., :start, :] = 0
        if decoded is not None:
            out[..., start : start + compressed, :] = decoded
        elif stored is not None:
            blocks, block = stored.shape[2], stored.shape[3]
            chunk = blocks if decompresses_in_place(out) else DECOMPRESS_CHUNK
            for first in range(0, blocks, chunk):
                last = min(first + chunk, blocks)
                target = out[..., start + first * block : start + last * block, :]
                part = stored.apply(lambda t, a=first, b=last: t[:, :, a:b])
                part.decompress(out=target.view(part.shape))
            if rotation is not None:
                for first in range(0, blocks, DECOMPRESS_CHUNK):
                    last = min(first + DECOMPRESS_CHUNK, blocks)
                    target = out[..., start + first * block : start + last * block, :]
                    rotation.rotate_(target, start + first * block, self.padding)
        start += compressed
        out[..., start : start + buffer.shape[-2], :] = buffer
        out[..., start + buffer.shape[-2] :, :] = new
        return out

    def compress_full_blocks(self) -> None:
        """Move the buffer's oldest whole blocks of ``n_b`` tokens into the compressed store."""
        block = self.config.buffer_size
        blocks = self.keys.shape[-2] // block
        if blocks == 0:
            return
        batch, heads, _, head_dim = self.keys.shape
        count = blocks * block
        first = self.phase + self.compressed_blocks * block
        keys = self.keys[..., :count, :]
        if self.rotation is not None:
            keys = self.rotation.unrotate(keys, first, self.padding)
        new_keys, new_values = (
            compress(t.reshape(batch, heads, blocks, block, head_dim), self.config, kind)
            for t, kind in ((keys, "key"), (self.values[..., :count, :], "value"))
        )
        if self.config.decoded_buffer:
            decoded = [
                t.decompress(self.dtype).reshape(batch, heads, count, head_dim)
                for t in (new_keys, new_values)
            ]
            if self.rotation is not None:
                decoded[0] = self.rotation.rotate(decoded[0], first, self.padding)
            if self.decoded_keys is not None:
                decoded = [
                    torch.cat([old, part], dim=-2)
                    for old, part in zip(
                        (self.decoded_keys, self.decoded_values), decoded, strict=True
                    )
                ]
            self.decoded_keys, self.decoded_values = decoded
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

    def crop(self, count: int) -> None:
        """Remove the last ``count`` tokens (``0 <= count <= T - φ``).

        Tokens still in the buffer are simply dropped, which is exact. Removing more reaches into
        compressed blocks: the last blocks needed are decompressed back into the buffer, in the
        model's dtype, and then cut, so that the tokens kept read back as they did before.
        """
        stored = self.length - self.phase
        if not 0 <= count <= stored:
            raise ValueError(f"can remove 0 to {stored} tokens from these rows, got {count}")
        buffered = self.keys.shape[-2]
        if count > buffered:
            blocks = -(-(count - buffered) // self.config.buffer_size)
            kept = self.compressed_blocks - blocks
            self.keys, self.values = (
                torch.cat([self._pop_blocks(stored_part, kept, rotation), buffer], dim=-2)
                for stored_part, buffer, rotation in (
                    (self.compressed_keys, self.keys, self.rotation),
                    (self.compressed_values, self.values, None),
                )
            )
            if self.decoded_keys is not None:
                tokens = kept * self.config.buffer_size
                self.decoded_keys = self.decoded_keys[..., :tokens, :].clone()
                self.decoded_values = self.decoded_values[..., :tokens, :].clone()
            if kept == 0:
                self.compressed_keys = self.compressed_values = None
                self.decoded_keys = self.decoded_values = None
            else:
                self.compressed_keys, self.compressed_values = (
                    t.apply(lambda x: x[:, :, :kept].clone())
                    for t in (self.compressed_keys, self.compressed_values)
                )
        if count:
            self.keys = self.keys[..., : self.keys.shape[-2] - count, :].clone()
            self.values = self.values[..., : self.values.shape[-2] - count, :].clone()

    def _pop_blocks(
        self, stored: CompressedTensor, kept: int, rotation: KeyRotation | None
    ) -> torch.Tensor:
        """The blocks after the first ``kept``, as ``[b, kv_heads, tokens, head_dim]``, rotated
        back to their positions by ``rotation`` (pre-RoPE keys)."""
        tail = stored.apply(lambda x: x[:, :, kept:])
        batch, heads, blocks, block, head_dim = tail.shape
        tokens = tail.decompress(self.dtype).reshape(batch, heads, blocks * block, head_dim)
        if rotation is None:
            return tokens
        return rotation.rotate(tokens, self.phase + kept * block, self.padding)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (acting on the batch dimension only) to every held tensor."""
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.padding = fn(self.padding)
        if self.decoded_keys is not None:
            self.decoded_keys, self.decoded_values = fn(self.decoded_keys), fn(self.decoded_values)
        if self.compressed_keys is not None:
            self.compressed_keys = self.compressed_keys.apply(fn)
            self.compressed_values = self.compressed_values.apply(fn)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held: the buffer, the decoded blocks if kept, then those of the compressed
        keys and values."""
        held = [self.keys, self.values]
        if self.decoded_keys is not None:
            held.extend([self.decoded_keys, self.decoded_values])
        for stored in (self.compressed_keys, self.compressed_values):
            if stored is not None:
                held.extend(stored.tensors())
        return held

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffer plus every tensor of the compressed keys and values."""
        return sum(t.numel() * t.element_size() for t in self.tensors())
