"""Character-level language modelling on real English text, available offline.

The text is the standard library's ``pydoc_data`` topics (about 465k characters). Characters are
the tokens: the vocabulary is every character of the text, in sorted order, so ids are the same
in every process. The first 90% of the text is for training, the rest for evaluation.

The model is a small Llama (transformers' ``LlamaForCausalLM``) with seeded initialisation, so
that the comm-hook benchmark trains a real transformer whose gradients are large enough for
communication to matter (the default, :data:`BENCH_LM`, has about 12M parameters, a 48 MB fp32
gradient), and so that :class:`sketchcomm.gear.GEARCache` can cache its keys and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BENCH_LM",
    "TINY_LM",
    "CharText",
    "CharTokenizer",
    "LMShape",
    "lm_batches",
    "lm_loss",
    "load_char_text",
    "make_lm",
]


@dataclass(frozen=True)
class LMShape:
    """Shape of the Llama built by :func:`make_lm`.

    ``hidden`` must be divisible by ``heads`` and ``heads`` by ``kv_heads`` (grouped-query
    attention when ``kv_heads < heads``).
    """

    hidden: int = 384
    layers: int = 6
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 1536
    max_positions: int = 512


BENCH_LM = LMShape()
TINY_LM = LMShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=256)


@dataclass
class CharText:
    """Encoded text: ``train`` and ``test`` are int64 vectors of character ids."""

    vocab: str
    train: torch.Tensor
    test: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Character ids ``[len(text)]``; raises ``ValueError`` for characters not in the text."""
        index = {ch: i for i, ch in enumerate(self.vocab)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise ValueError(f"characters not in the vocabulary: {missing[:10]}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())

    def tokenizer(self) -> CharTokenizer:
        """A tokenizer for :func:`sketchcomm.gear.generation_eval` and other transformers code."""
        return CharTokenizer(self)


class CharTokenizer:
    """The small part of a transformers tokenizer that generation code uses, over characters.

    ``tokenizer(text)["input_ids"]`` is the list of character ids, ``batch_decode`` joins ids
    back into text. There is no end-of-sequence token; the padding token is the space, which a
    left-padded batch masks out with its attention mask.
    """

    def __init__(self, text: CharText) -> None:
        self.text = text
        self.pad_token_id = text.vocab.index(" ")
        self.eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.text.encode(text).tolist()}

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [self.text.decode(row) for row in ids]


def load_char_text(test_fraction: float = 0.1) -> CharText:
    """The ``pydoc_data`` topics as character ids, split into train and test by position."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    vocab = "".join(sorted(set(text)))
    lookup = torch.full((max(map(ord, vocab)) + 1,), -1, dtype=torch.int64)
    lookup[torch.tensor([ord(ch) for ch in vocab])] = torch.arange(len(vocab))
    ids = lookup[torch.tensor([ord(ch) for ch in text])]
    split = int(len(ids) * (1.0 - test_fraction))
    return CharText(vocab, ids[:split], ids[split:])


def make_lm(vocab_size: int, shape: LMShape = BENCH_LM, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of the given shape with seeded initialisation, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(f"hidden must divide by heads and heads by kv_heads, got {shape}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def lm_batches(
    ids: torch.Tensor, batch_size: int, seq_len: int, *, seed: int, rank: int = 0
) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len]`` windows of ``ids`` at random offsets.

    Each rank draws from its own generator (``seed`` and ``rank``), so ranks see different data
    and a run is reproducible.
    """
    if seq_len >= ids.numel():
        raise ValueError(f"seq_len {seq_len} must be below the text length {ids.numel()}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (nats) of ``batch`` ``[B, T]``."""
    return model(input_ids=batch, labels=batch).loss
