"""Byte-level language modelling with a transformers GPT-2, available offline.

The text is the standard library's ``pydoc_data`` topics (about 465k characters), encoded as
UTF-8: the tokens are its bytes, so the vocabulary is the 256 byte values whatever the text. The
first 90% of the bytes are for training, the rest for evaluation.

The model is ``GPT2LMHeadModel`` built from a config (no download), 2 layers, 128 wide, 4 heads,
256 positions (about 0.46M parameters, its output layer tied to the byte embedding), with seeded
initialisation and dropout off, so that runs of one seed differ only by their communication hook.

>>> text = load_byte_text()
>>> text.vocab_size, text.train.dtype
(256, torch.int64)
>>> model = make_gpt2(text.vocab_size, seed=0)
>>> sum(p.numel() for p in model.parameters())
462336
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ACCURACY_GPT2", "ByteText", "GPT2Shape", "load_byte_text", "make_gpt2"]


@dataclass(frozen=True)
class GPT2Shape:
    """Shape of the GPT-2 built by :func:`make_gpt2` (``width`` divisible by ``heads``)."""

    layers: int = 2
    width: int = 128
    heads: int = 4
    positions: int = 256


#: The accuracy benchmark's GPT-2: ``GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=256,
#: n_positions=256)``.
ACCURACY_GPT2 = GPT2Shape()


@dataclass
class ByteText:
    """UTF-8 bytes of a text: ``train`` and ``test`` are int64 vectors of values in ``[0, 256)``."""

    train: torch.Tensor
    test: torch.Tensor
    vocab_size: int = 256


def load_byte_text(test_fraction: float = 0.1) -> ByteText:
    """The ``pydoc_data`` topics as UTF-8 bytes, split into train and test by position."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from pydoc_data.topics import topics

    data = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    split = int(len(ids) * (1.0 - test_fraction))
    return ByteText(ids[:split], ids[split:])


def make_gpt2(vocab_size: int = 256, shape: GPT2Shape = ACCURACY_GPT2, seed: int = 0) -> nn.Module:
    """A ``GPT2LMHeadModel`` of the given shape, seeded initialisation, no dropout, train mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if shape.width % shape.heads:
        raise ValueError(f"width must divide by heads, got {shape}")
    config = GPT2Config(
        n_layer=shape.layers,
        n_embd=shape.width,
        n_head=shape.heads,
        vocab_size=vocab_size,
        n_positions=shape.positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).train()
