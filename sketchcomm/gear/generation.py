"""Greedy generation through a cache, and a compact check to run during training.

[`generation_eval()`][sketchcomm.gear.generation.generation_eval] decodes a few prompts greedily
twice, once with ``DynamicCache`` and once with a [`GEARCache`][sketchcomm.gear.cache.GEARCache],
and reports how far the compressed cache moves the continuations. It is cheap enough to call
periodically from rank 0 of a training job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import GEARCache
from .config import GEARConfig
from .memory import cache_nbytes, float16_nbytes


@torch.no_grad()
def greedy_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache,
    max_new_tokens: int,
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy continuation ``[batch, max_new_tokens]`` of ``input_ids`` with ``model.generate``.

    Sequences that stop early (end-of-sequence) are padded with ``pad_token_id``.
    """
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_token_id,
    )
    new = out[:, input_ids.shape[1] :]
    missing = max_new_tokens - new.shape[1]
    return torch.nn.functional.pad(new, (0, missing), value=pad_token_id) if missing else new


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Compare two ``[batch, n]`` continuations.

    Returns:
        ``(token, prefix)``: the fraction of positions where they agree, and the mean fraction
        of the ``n`` tokens before their first disagreement.
    """
    same = tokens == reference
    prefix = same.int().cumprod(dim=1).sum(dim=1).float() / same.shape[1]
    return same.float().mean().item(), prefix.mean().item()


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``, both ``[batch, longest]``."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq) :] = torch.tensor(list(seq))
            mask[row, longest - len(seq) :] = 1
    return ids, mask


@dataclass
class GenerationReport:
    """Outcome of [`generation_eval()`][sketchcomm.gear.generation.generation_eval].

    Attributes:
        texts: continuations decoded with the GEAR cache.
        reference_texts: continuations decoded with ``DynamicCache``.
        token_agreement: fraction of generated positions where both agree.
        prefix_agreement: mean fraction of tokens generated before the first disagreement.
        kv_bytes: bytes held by the GEAR cache at the end of generation.
        kv_float16_bytes: bytes the same tokens take in an uncompressed float16 cache.
        seconds: wall time of the GEAR generation.
        reference_seconds: wall time of the uncompressed generation.
    """

    texts: list[str]
    reference_texts: list[str]
    token_agreement: float
    prefix_agreement: float
    kv_bytes: int
    kv_float16_bytes: int
    seconds: float
    reference_seconds: float

    def metrics(self, prefix: str = "gear/") -> dict[str, float]:
        """Scalar metrics for a logger, keys prefixed with ``prefix``."""
        return {
            f"{prefix}token_agreement": self.token_agreement,
            f"{prefix}prefix_agreement": self.prefix_agreement,
            f"{prefix}kv_bytes": float(self.kv_bytes),
            f"{prefix}kv_compression": self.kv_float16_bytes / max(self.kv_bytes, 1),
            f"{prefix}seconds": self.seconds,
            f"{prefix}reference_seconds": self.reference_seconds,
        }


def generation_eval(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    cache_config: GEARConfig,
    max_new_tokens: int = 32,
) -> GenerationReport:
    """Greedy continuations of ``prompts`` with a GEAR cache, compared with ``DynamicCache``.

    The prompts are left-padded into one batch. The model is put in eval mode for the call and
    its previous mode restored afterwards; pass the unwrapped module of a DDP model.

    Args:
        model: a transformers causal language model.
        tokenizer (transformers.PreTrainedTokenizerBase): its tokenizer.
        prompts: the prompts (at least one).
        cache_config: the GEAR settings of the compressed cache.
        max_new_tokens: tokens generated per prompt.

    Returns:
        A [`GenerationReport`][sketchcomm.gear.generation.GenerationReport].
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("every prompt must encode to at least one token")
    device = next(model.parameters()).device
    input_ids, mask = (t.to(device) for t in left_pad(encoded, pad))

    was_training = model.training
    model.eval()
    try:
        reference_cache = GEARCache(GEARConfig(bits=None), config=model.config)
        start = time.perf_counter()
        reference = greedy_tokens(model, input_ids, mask, reference_cache, max_new_tokens, pad)
        reference_seconds = time.perf_counter() - start
        cache = GEARCache(cache_config, config=model.config)
        start = time.perf_counter()
        tokens = greedy_tokens(model, input_ids, mask, cache, max_new_tokens, pad)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)

    token_agreement, prefix_agreement = agreement(tokens, reference)
    return GenerationReport(
        texts=tokenizer.batch_decode(tokens, skip_special_tokens=True),
        reference_texts=tokenizer.batch_decode(reference, skip_special_tokens=True),
        token_agreement=token_agreement,
        prefix_agreement=prefix_agreement,
        kv_bytes=cache_nbytes(cache),
        kv_float16_bytes=float16_nbytes(reference_cache),
        seconds=seconds,
        reference_seconds=reference_seconds,
    )
