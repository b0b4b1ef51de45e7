"""Evaluation of KV-cache compression with the cache in the decoding loop.

For every cache, ``batch`` segments of a text are run through the model: a prefill of ``P``
tokens, then ``N`` single-token steps, each reading the keys and values of all earlier tokens
back from the cache, so that compression affects every evaluated prediction. Reported per cache:

* perplexity ``exp(-(1/(B N)) Σ log p(x_{t+1} | x_{≤t}))`` over the ``B N`` step predictions;
* ``KL(p_ref || p)``, the mean over steps of the KL divergence (nats) from the next-token
  distribution with the uncompressed cache to the one with this cache, and the fraction of steps
  whose most likely token agrees;
* greedy agreement: ``model.generate`` continues the first ``P`` tokens greedily for ``G`` tokens;
  the fraction of positions equal to the uncompressed continuation and the mean fraction before
  the first difference;
* KV bytes held at the end (``P + N`` tokens) and averaged over the steps, next to the float16
  size of the same tokens uncompressed;
* the median wall time of one decoding step. All caches decode in lockstep, taking turns within
  every step, so that a change in the machine's load affects them alike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sketchcomm.gear.generation import agreement, greedy_tokens
from sketchcomm.gear.memory import cache_nbytes, float16_nbytes


@dataclass
class Candidate:
    """A cache to evaluate: a display name, settings for the report, and a factory."""

    name: str
    make: Callable[[], Any]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheResult:
    """Measurements of one cache (see the module docstring)."""

    name: str
    settings: dict[str, Any]
    perplexity: float
    kl_divergence: float
    top1_agreement: float
    greedy_token_agreement: float
    greedy_prefix_agreement: float
    kv_bytes: int
    kv_float16_bytes: int
    kv_bytes_mean: float
    kv_float16_bytes_mean: float
    ms_per_step: float
    ms_per_step_mean: float

    @property
    def compression(self) -> float:
        """Float16 size over bytes held, at the end of the evaluation."""
        return self.kv_float16_bytes / self.kv_bytes

    @property
    def compression_mean(self) -> float:
        """Float16 size over bytes held, both averaged over the decoding steps."""
        return self.kv_float16_bytes_mean / self.kv_bytes_mean

    def as_dict(self) -> dict[str, Any]:
        """All fields and the two compression ratios, for JSON."""
        return {
            **asdict(self),
            "compression": self.compression,
            "compression_mean": self.compression_mean,
        }


@dataclass
class Track:
    """What :func:`decode_in_lockstep` records for one cache.

    Attributes:
        cache: the cache object.
        nll: summed negative log-likelihood of the scored tokens (nats).
        kl: summed ``KL(p_reference || p)`` over steps and batch rows (nats).
        top1: number of predictions whose most likely token is the reference's.
        step_seconds: wall time of every decoding step.
        kv_bytes: bytes held by the cache after every step.
    """

    cache: Any
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    step_seconds: list[float] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)


@torch.inference_mode()
def decode_in_lockstep(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prefill: int,
    caches: list[Any],
    log: Callable[[str], None] | None = None,
) -> list[Track]:
    """Prefill every cache with ``input_ids[:, :prefill]``, then decode through all of them.

    Step ``i`` feeds token ``prefill + i`` to the model once per cache and scores token
    ``prefill + i + 1``. The caches take turns within a step, in an order rotated every step, so
    that changes in the machine's load touch all of them alike. The first cache is the reference
    of the KL divergence and of the top-1 agreement.

    Args:
        model: a causal language model.
        input_ids: ``[batch, prefill + steps + 1]`` token ids.
        prefill: prompt length ``P >= 1``.
        caches: cache objects, passed as ``cache=`` to the model; the reference first.
        log: optional progress callback.

    Returns:
        One :class:`Track` per cache.
    """
    steps = input_ids.shape[1] - prefill - 1
    if prefill < 1 or steps < 1:
        raise ValueError(
            f"need prefill >= 1 and at least one step, got shape {tuple(input_ids.shape)}"
        )
    tracks = [Track(cache) for cache in caches]
    for track in tracks:
        model(input_ids[:, :prefill], cache=track.cache, use_cache=True)
    for i in range(steps):
        token = input_ids[:, prefill + i : prefill + i + 1]
        target = input_ids[:, prefill + i + 1, None]
        logprobs: list[torch.Tensor] = [torch.empty(0)] * len(tracks)
        for j in range(len(tracks)):
            track = tracks[(i + j) % len(tracks)]
            start = time.perf_counter()
            logits = model(token, cache=track.cache, use_cache=True).logits
            if logits.is_cuda:  # kernels run asynchronously: time them to completion
                torch.cuda.synchronize(logits.device)
            track.step_seconds.append(time.perf_counter() - start)
            track.kv_bytes.append(cache_nbytes(track.cache))
            logprobs[(i + j) % len(tracks)] = logits[:, -1].float().log_softmax(-1)
        reference = logprobs[0]
        for track, logp in zip(tracks, logprobs, strict=True):
            track.nll -= logp.gather(-1, target).sum().item()
            track.kl += (reference.exp() * (reference - logp)).sum().item()
            track.top1 += int((reference.argmax(-1) == logp.argmax(-1)).sum())
        if log is not None and (i + 1) % 128 == 0:
            log(f"step {i + 1}/{steps}")
    return tracks


def evaluate_caches(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prefill: int,
    candidates: list[Candidate],
    reference: Candidate,
    generate_tokens: int = 32,
    pad_token_id: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[CacheResult]:
    """Evaluate the uncompressed ``reference`` cache and every candidate against it.

    Args:
        model: a causal language model in eval mode.
        input_ids: ``[batch, prefill + steps + 1]`` token ids (see :func:`decode_in_lockstep`).
        prefill: prompt length ``P``; the greedy continuations also start from these tokens.
        candidates: caches to compare with the reference.
        reference: the uncompressed cache (``DynamicCache``).
        generate_tokens: length ``G`` of the greedy continuations (0 skips them).
        pad_token_id: padding id for ``generate``.
        log: optional progress callback.

    Returns:
        One :class:`CacheResult` per cache, the reference first.
    """
    everyone = [reference, *candidates]
    # A short untimed pass first, so that one-off allocations do not land on the measurements.
    warm_up = min(prefill, 8)
    decode_in_lockstep(model, input_ids[:, : warm_up + 3], warm_up, [reference.make()])
    if log is not None:
        log(f"decoding through {len(everyone)} caches in lockstep")
    tracks = decode_in_lockstep(model, input_ids, prefill, [c.make() for c in everyone], log)
    steps = len(tracks[0].step_seconds)
    predictions = steps * input_ids.shape[0]
    float16_per_token = float16_nbytes(tracks[0].cache) / (prefill + steps)
    float16_per_step = [float16_per_token * (prefill + i + 1) for i in range(steps)]

    results = []
    reference_tokens = None
    for candidate, track in zip(everyone, tracks, strict=True):
        token_agree = prefix_agree = 0.0
        if generate_tokens > 0:
            if log is not None:
                log(f"greedy generation with {candidate.name}")
            prompt = input_ids[:, :prefill]
            tokens = greedy_tokens(
                model,
                prompt,
                torch.ones_like(prompt),
                candidate.make(),
                generate_tokens,
                pad_token_id,
            )
            reference_tokens = tokens if reference_tokens is None else reference_tokens
            token_agree, prefix_agree = agreement(tokens, reference_tokens)
        results.append(
            CacheResult(
                name=candidate.name,
                settings=candidate.settings,
                perplexity=math.exp(track.nll / predictions),
                kl_divergence=track.kl / predictions,
                top1_agreement=track.top1 / predictions,
                greedy_token_agreement=token_agree,
                greedy_prefix_agreement=prefix_agree,
                kv_bytes=track.kv_bytes[-1],
                kv_float16_bytes=round(float16_per_step[-1]),
                kv_bytes_mean=statistics.fmean(track.kv_bytes),
                kv_float16_bytes_mean=statistics.fmean(float16_per_step),
                ms_per_step=1000 * statistics.median(track.step_seconds),
                ms_per_step_mean=1000 * statistics.fmean(track.step_seconds),
            )
        )
    return results


def markdown_table(results: list[CacheResult]) -> str:
    """A Markdown table of the results; ratios are taken against the first (reference) row."""
    base = results[0]
    header = (
        "| cache | perplexity | Δ ppl | KL (nats) | top-1 agree | greedy prefix | KV bytes "
        "| ×fp16 (end / mean) | ms/step | step vs uncompressed |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r.name} | {r.perplexity:.3f} | {100 * (r.perplexity / base.perplexity - 1):+.2f}% "
            f"| {r.kl_divergence:.4f} | {100 * r.top1_agreement:.1f}% "
            f"| {100 * r.greedy_prefix_agreement:.0f}% | {r.kv_bytes:,} "
            f"| {r.compression:.2f} / {r.compression_mean:.2f} | {r.ms_per_step:.1f} "
            f"| {r.ms_per_step / base.ms_per_step:.2f}× |"
        )
    return "\n".join(lines)
