"""Teacher-forced perplexity of a streaming compressed KV cache in one forward pass.

The decoding loop of [`benchmarks.gear_evaluate`][benchmarks.gear_evaluate] runs ``N`` single-token
steps through a real cache. Its result can be computed in one forward pass over the ``P + N + 1``
tokens, because what a query attends depends only on positions: a cache that compresses its
buffer in whole blocks of ``n_b`` tokens at the start of every call (as
[`GEARCache`][sketchcomm.gear.GEARCache] does) lets the query at position ``t`` read

* every earlier position exactly, during the prefill (``t < P``);
* the positions ``s < ⌊t / n_b⌋ n_b`` through their compressed form and the later ones exactly,
  when decoding (``t >= P``).

A compressed block depends only on the keys and values of its own tokens, which the same forward
pass computes (each from the attention its own query got), so replacing every attention layer by

    out_t = Σ_s p_ts (M_ts V̂_s + (1 - M_ts) V_s),
    p_t = softmax_s(q_t · (M_ts K̂_s + (1 - M_ts) K_s))

with the mask ``M`` above reproduces the loop's predictions up to float rounding (tested in
``benchmarks/tests/test_gear_eval.py``), at the cost of one prefill. This makes the error
breakdown (keys or values alone, one layer at a time) and long sequences affordable on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

CompressBlocks = Callable[[torch.Tensor, str, int], tuple[torch.Tensor, int]]
"""``(blocks [b, kv_heads, c, n_b, head_dim] float32, "key" | "value", layer) -> (approximation,
bytes held)``."""


@dataclass
class SimulatedRun:
    """Result of :func:`simulate`.

    Attributes:
        perplexity: over the ``B N`` decoding predictions.
        nll: per-row summed negative log-likelihood (nats), ``[B]``.
        kv_bytes: bytes held at the end: compressed blocks plus the buffer in the cache's dtype.
        kv_float16_bytes: the same tokens in float16.
    """

    perplexity: float
    nll: torch.Tensor
    kv_bytes: int
    kv_float16_bytes: int

    @property
    def compression(self) -> float:
        """Float16 size over bytes held."""
        return self.kv_float16_bytes / self.kv_bytes


def compressed_mask(length: int, prefill: int, block: int, device=None) -> torch.Tensor:
    """``M[t, s]``: whether the query at ``t`` reads position ``s`` compressed, ``[L, L]``."""
    t = torch.arange(length, device=device)[:, None]
    s = torch.arange(length, device=device)[None, :]
    return (t >= prefill) & (s < torch.div(t, block, rounding_mode="floor") * block)


@torch.inference_mode()
def simulate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prefill: int,
    block: int,
    compress_blocks: CompressBlocks,
    cache_dtype: torch.dtype = torch.float16,
) -> SimulatedRun:
    """Perplexity of ``N = L - P - 1`` teacher-forced decoding steps through a streaming cache.

    Args:
        model: a causal LM whose attention layers dispatch through transformers'
            ``AttentionInterface`` (Llama-like models); its attention implementation is
            switched for the pass and restored afterwards.
        input_ids: ``[B, L]`` tokens; the predictions of positions ``P .. L-2`` are scored.
        prefill: ``P``.
        block: ``n_b``, the tokens of one compressed block.
        compress_blocks: the compression (see :data:`CompressBlocks`); it is given blocks in
            ``cache_dtype``.
        cache_dtype: dtype of the cache: every key and value is read back rounded to it, and the
            buffer counts its bytes. A float32 model with a float16 cache stands for a float16
            model at a quarter of the CPU time.
    """
    length = input_ids.shape[1]
    steps = length - prefill - 1
    if steps < 1:
        raise ValueError("input_ids must hold at least prefill + 2 tokens")
    mask = compressed_mask(length, prefill, block, input_ids.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    # Blocks compressed by the start of the last call (which fed token L - 2): the most any
    # query reads compressed, and what the cache holds at the end.
    held_blocks = (length - 2) // block
    held_bytes = [0]

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer = module.layer_idx
        batch, heads, _, head_dim = key.shape
        end = held_blocks * block
        keys, values = key.to(cache_dtype), value.to(cache_dtype)
        approx = []
        for states, kind in ((keys, "key"), (values, "value")):
            blocks = states[..., :end, :].reshape(batch, heads, held_blocks, block, head_dim)
            decoded, nbytes = compress_blocks(blocks, kind, layer)
            held_bytes[0] += nbytes
            decoded = decoded.float().reshape(batch, heads, end, head_dim)
            approx.append(torch.cat([decoded, states[..., end:, :].float()], dim=-2))
        keys, values = keys.float(), values.float()
        groups = query.shape[1] // heads

        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(groups, dim=1)

        q = query.float()
        exact_scores = q @ expand(keys).transpose(-1, -2)
        approx_scores = q @ expand(approx[0]).transpose(-1, -2)
        scores = torch.where(mask, approx_scores, exact_scores) * scaling
        probs = scores.masked_fill(~causal, -math.inf).softmax(-1)
        out = (probs * mask) @ expand(approx[1]) + (probs * ~mask) @ expand(values)
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    name = "sketchcomm_streaming_simulation"
    AttentionInterface.register(name, attention)
    # transformers has a setter (set_attn_implementation) but no public getter for this field.
    previous = getattr(model.config, "_attn_implementation")  # noqa: B009
    model.set_attn_implementation(name)
    try:
        logits = model(input_ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
    logprobs = logits[:, prefill:-1].float().log_softmax(-1)
    nll = -logprobs.gather(-1, input_ids[:, prefill + 1 :, None]).squeeze(-1).sum(-1)
    text_config = model.config.get_text_config(decoder=True)
    kv_heads = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    entries = 2 * kv_heads * head_dim * text_config.num_hidden_layers * input_ids.shape[0]
    entry_bytes = torch.finfo(cache_dtype).bits // 8
    tokens = length - 1
    buffer = tokens - held_blocks * block
    return SimulatedRun(
        perplexity=math.exp(nll.sum().item() / (steps * input_ids.shape[0])),
        nll=nll,
        kv_bytes=held_bytes[0] + buffer * entries * entry_bytes,
        kv_float16_bytes=tokens * entries * 2,
    )
