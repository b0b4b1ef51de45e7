"""Perplexity against KV bytes: the accuracy-per-byte frontier of GEAR and its baselines.

For every text and prompt length ``P``, a segment of ``P + N + 1`` tokens is scored over ``N``
teacher-forced decoding steps through a streaming cache, and every method is placed at
``(float16 bytes / bytes held, perplexity increase over the uncompressed cache)``:

* GEAR and quantization only (the same quantization without the low-rank and sparse parts) at
  every bit width, through the one-pass computation of
  [`benchmarks.gear_simulate`][benchmarks.gear_simulate], which gives the decoding loop's
  predictions (same blocks, same compression) at the cost of one prefill;
* transformers' ``QuantizedCache(backend="quanto")`` at 2 and 4 bits when optimum-quanto is
  installed, through the real decoding loop (its quantization is not reproduced here).

Bytes are every byte held after the last step: codes, scales, minima, factors, outliers, and
the full-precision buffer counted in float16.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.gear_simulate import simulate
from sketchcomm.gear.compression import compress
from sketchcomm.gear.config import GEARConfig
from sketchcomm.gear.rope import rotation_for


def stdlib_docstrings(limit: int = 400_000) -> str:
    """Docstrings longer than 200 characters of the standard library's top-level modules, in
    file order, until ``limit`` characters (read from the Python installation's source)."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
                    total += len(doc)
        if total > limit:
            break
    return "\n\n".join(parts)


def license_text() -> str:
    """The GNU GPL version 3 as the system ships it (``/usr/share/common-licenses/GPL-3``), or
    else the Python installation's ``LICENSE.txt``."""
    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():
        return gpl.read_text(encoding="utf-8")
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")


TEXTS: dict[str, Callable[[], str]] = {"docstrings": stdlib_docstrings, "license": license_text}


@dataclass
class FrontierPoint:
    """One method on one text and prompt length.

    Attributes:
        text: name of the text.
        prefill: prompt tokens ``P``.
        tokens: decoding steps ``N``.
        method: ``"GEAR"``, ``"quant-only"`` or ``"quanto"``.
        bits: bits per code.
        settings: a short description of the settings.
        perplexity: over the ``N`` decoding predictions.
        reference_perplexity: the same with the uncompressed cache.
        kv_bytes: bytes held after the last step.
        kv_float16_bytes: the same tokens in float16.
        source: ``"one pass"`` or ``"decoding loop"``.
    """

    text: str
    prefill: int
    tokens: int
    method: str
    bits: int
    settings: str
    perplexity: float
    reference_perplexity: float
    kv_bytes: int
    kv_float16_bytes: int
    source: str

    @property
    def compression(self) -> float:
        """Float16 bytes over bytes held."""
        return self.kv_float16_bytes / self.kv_bytes

    @property
    def increase(self) -> float:
        """Perplexity increase over the uncompressed cache, in percent."""
        return 100.0 * (self.perplexity / self.reference_perplexity - 1.0)


def block_compressor(config: GEARConfig | None, model_config):
    """The :data:`benchmarks.gear_simulate.CompressBlocks` of ``config`` (``None``: exact); layer
    ``l`` is compressed with ``config.for_layer(l)``, as in ``GEARCache``. Where
    ``config.key_rope`` undoes the RoPE of ``model_config``, as in ``GEARCache`` too, the keys
    are un-rotated before compression and rotated back after, the ``i``-th token of every row
    being at position ``i`` (the one-pass computation has no padding)."""
    rotation = None if config is None else rotation_for(config, model_config)

    def compress_blocks(blocks: torch.Tensor, kind: str, layer: int):
        if config is None or blocks.numel() == 0:
            return blocks, blocks.numel() * blocks.element_size() if config is None else 0
        turn = rotation is not None and kind == "key"
        if turn:
            blocks = rotation.unrotate(blocks.flatten(2, 3)).view(blocks.shape)
        stored = compress(blocks, config.for_layer(layer), kind)
        decoded = stored.decompress()
        if turn:
            decoded = rotation.rotate(decoded.flatten(2, 3)).view(blocks.shape)
        return decoded, stored.nbytes

    return compress_blocks


def one_pass_points(
    model, input_ids: torch.Tensor, prefill: int, configs: list[GEARConfig], text: str
) -> list[FrontierPoint]:
    """The uncompressed reference, then every config, by the one-pass computation."""
    reference = simulate(model, input_ids, prefill, 64, block_compressor(None, None))
    points = []
    for config in configs:
        run = simulate(
            model, input_ids, prefill, config.buffer_size, block_compressor(config, model.config)
        )
        points.append(
            FrontierPoint(
                text=text,
                prefill=prefill,
                tokens=input_ids.shape[1] - prefill - 1,
                method="GEAR" if config.corrects else "quant-only",
                bits=config.bits,
                settings=config.describe(),
                perplexity=run.perplexity,
                reference_perplexity=reference.perplexity,
                kv_bytes=run.kv_bytes,
                kv_float16_bytes=run.kv_float16_bytes,
                source="one pass",
            )
        )
    return points


def quanto_points(
    model, input_ids: torch.Tensor, prefill: int, bits: list[int], text: str, group_size: int = 64
) -> list[FrontierPoint]:
    """transformers' quanto cache at each of ``bits`` (2 or 4), through the decoding loop."""
    from transformers import DynamicCache, QuantizedCache

    from benchmarks.gear_evaluate import decode_in_lockstep
    from sketchcomm.gear.memory import cache_nbytes, float16_nbytes

    caches = [DynamicCache(config=model.config)] + [
        QuantizedCache(
            backend="quanto",
            config=model.config,
            nbits=b,
            q_group_size=group_size,
            residual_length=64,
        )
        for b in bits
    ]
    tracks = decode_in_lockstep(model, input_ids, prefill, caches)
    steps = input_ids.shape[1] - prefill - 1
    predictions = steps * input_ids.shape[0]
    reference = math.exp(tracks[0].nll / predictions)
    float16 = float16_nbytes(tracks[0].cache)
    return [
        FrontierPoint(
            text=text,
            prefill=prefill,
            tokens=steps,
            method="quanto",
            bits=b,
            settings=f"quanto {b}-bit g{group_size} res64",
            perplexity=math.exp(track.nll / predictions),
            reference_perplexity=reference,
            kv_bytes=cache_nbytes(track.cache),
            kv_float16_bytes=float16,
            source="decoding loop",
        )
        for b, track in zip(bits, tracks[1:], strict=True)
    ]


def frontier_configs(recipe: GEARConfig, bits: list[int]) -> list[GEARConfig]:
    """Quantization only and GEAR (``recipe``'s low rank and outliers) at every bit width."""
    configs = []
    for b in bits:
        config = dataclasses.replace(recipe, bits=b)
        configs.extend([config.quantization_only(), config])
    return configs


def markdown_frontier(points: list[FrontierPoint]) -> str:
    """A Markdown table: one row per point, grouped by text and prompt length."""
    lines = [
        "| text | prompt + steps | method | bits | settings | ppl | Δ ppl | ×fp16 | measured by |",
        "|" + "---|" * 9,
    ]
    for p in points:
        lines.append(
            f"| {p.text} | {p.prefill} + {p.tokens} | {p.method} | {p.bits} | {p.settings} "
            f"| {p.perplexity:.3f} | {p.increase:+.2f}% | {p.compression:.2f} | {p.source} |"
        )
    return "\n".join(lines)
