"""Per-layer precision for GEAR: spend bits and low rank where the error is.

A *layer recipe* gives every attention layer ``l`` its own key config and value config (bits,
rank, groups). It is measured with the one-pass computation of
[`benchmarks.gear_simulate`][benchmarks.gear_simulate] (the decoding loop's perplexity at the
cost of one prefill) and placed on the perplexity-against-bytes frontier like the uniform
recipes of [`benchmarks.gear_frontier`][benchmarks.gear_frontier].

The recipe is chosen from a cheap per-layer statistic measured on a *calibration* text (the
``pydoc_data`` topics, neither of the evaluation texts): one exact forward pass in which every
attention layer also computes, for each candidate setting ``o`` of its keys (and of its values),
the relative error its attention output would have with only that tensor of only that layer
compressed,

    e_l(o) = ||softmax(q K̂ᵀ) V − softmax(q Kᵀ) V||² / ||softmax(q Kᵀ) V||²   (keys)
    e_l(o) = ||softmax(q Kᵀ) (V̂ − V)||² / ||softmax(q Kᵀ) V||²               (values)

summed over the queries that read compressed positions, with ``K̂``, ``V̂`` compressed in the
streaming blocks of the cache. [`allocate`][benchmarks.gear_layers.allocate] then minimises
``Σ_l e_l(o_l)`` under a byte budget (a Lagrangian sweep: every layer and tensor picks
``argmin e + λ·bytes``, and ``λ`` is bisected to the budget). No layer is picked by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface

from benchmarks.gear_frontier import TEXTS, FrontierPoint, block_compressor, markdown_frontier
from benchmarks.gear_simulate import compressed_mask, simulate
from sketchcomm.gear.config import GEARConfig
from sketchcomm.gear.loading import text_segments


@dataclass(frozen=True)
class LayerRecipe:
    """A config per layer for the keys and one for the values.

    Attributes:
        name: a short label for tables.
        keys: one config per layer for the keys.
        values: one config per layer for the values.
    """

    name: str
    keys: tuple[GEARConfig, ...]
    values: tuple[GEARConfig, ...]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError("keys and values need one config per layer each")
        buffers = {c.buffer_size for c in self.keys + self.values}
        if len(buffers) != 1:
            raise ValueError(f"every layer must share one buffer_size, got {sorted(buffers)}")

    @classmethod
    def uniform(cls, config: GEARConfig, layers: int, name: str | None = None) -> LayerRecipe:
        """``config`` on every layer."""
        return cls(name or config.describe(), (config,) * layers, (config,) * layers)

    @property
    def buffer_size(self) -> int:
        """The streaming block of every layer."""
        return self.keys[0].buffer_size

    def choice(self, layer: int, kind: str) -> GEARConfig:
        """The config of ``kind`` in ``layer``."""
        return (self.keys if kind == "key" else self.values)[layer]

    def mean_bits(self, kind: str) -> float:
        """Mean code bits of ``kind`` over the layers."""
        configs = self.keys if kind == "key" else self.values
        return sum(c.bits for c in configs) / len(configs)

    def describe(self) -> str:
        """Label, mean code bits of keys/values and the layers with a low-rank key term."""
        ranked = [i for i, c in enumerate(self.keys) if c.rank and c.corrected in ("key", "both")]
        return (
            f"{self.name}: keys {self.mean_bits('key'):.2f} b, values "
            f"{self.mean_bits('value'):.2f} b, key rank on {len(ranked)} layers"
        )


def recipe_point(
    model, input_ids: torch.Tensor, prefill: int, recipe: LayerRecipe, text: str, reference: float
) -> FrontierPoint:
    """``recipe`` on ``input_ids`` by the one-pass computation."""
    config = recipe_config(recipe)
    run = simulate(
        model, input_ids, prefill, recipe.buffer_size, block_compressor(config, model.config)
    )
    corrected = config.corrects
    return FrontierPoint(
        text=text,
        prefill=prefill,
        tokens=input_ids.shape[1] - prefill - 1,
        method="GEAR" if corrected else "quant-only",
        bits=round(recipe.mean_bits("key")),
        settings=recipe.describe(),
        perplexity=run.perplexity,
        reference_perplexity=reference,
        kv_bytes=run.kv_bytes,
        kv_float16_bytes=run.kv_float16_bytes,
        source="one pass",
    )


@dataclass
class LayerErrors:
    """Per-layer statistic of :func:`layer_errors`.

    Attributes:
        options: the candidate configs.
        key_error: ``[layers, options]`` relative attention-output error, keys compressed.
        value_error: ``[layers, options]`` the same, values compressed.
        key_bytes: ``[options]`` bytes of one layer's compressed keys (calibration length).
        value_bytes: ``[options]`` the same for the values.
        entries: entries of one layer's keys (batch x kv heads x compressed tokens x head dim).
    """

    options: list[GEARConfig]
    key_error: torch.Tensor
    value_error: torch.Tensor
    key_bytes: torch.Tensor
    value_bytes: torch.Tensor
    entries: int


@torch.inference_mode()
def layer_errors(
    model, input_ids: torch.Tensor, prefill: int, options: Sequence[GEARConfig]
) -> LayerErrors:
    """One exact forward pass; each layer measures the error of every option (module doc)."""
    options = list(options)
    block = options[0].buffer_size
    length = input_ids.shape[1]
    mask = compressed_mask(length, prefill, block, input_ids.device)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    held = (length - 1) // block
    layers = model.config.num_hidden_layers
    key_error = torch.zeros(layers, len(options))
    value_error = torch.zeros(layers, len(options))
    key_bytes = torch.zeros(len(options))
    value_bytes = torch.zeros(len(options))
    # Each option as the cache applies it (keys before RoPE where the option says so).
    compressors = [block_compressor(option, model.config) for option in options]

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        layer = module.layer_idx
        batch, heads, _, head_dim = key.shape
        groups = query.shape[1] // heads
        end = held * block
        q = query.float()
        k, v = key.half().float(), value.half().float()

        def expand(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(groups, dim=1)

        exact_scores = q @ expand(k).transpose(-1, -2)
        exact_p = (exact_scores * scaling).masked_fill(~causal, -math.inf).softmax(-1)
        exact = exact_p @ expand(v)
        reads = mask.any(-1)
        norm = exact[..., reads, :].pow(2).sum()
        for index, compress_blocks in enumerate(compressors):
            for kind, states in (("key", k), ("value", v)):
                blocks = states[..., :end, :].reshape(batch, heads, held, block, head_dim)
                decoded, nbytes = compress_blocks(blocks.half(), kind, layer)
                decoded = decoded.float().reshape(batch, heads, end, head_dim)
                approx = torch.cat([decoded, states[..., end:, :]], dim=-2)
                if kind == "key":
                    # Exact and compressed scores of one query share one softmax.
                    scores = torch.where(mask, q @ expand(approx).transpose(-1, -2), exact_scores)
                    out = (scores * scaling).masked_fill(~causal, -math.inf).softmax(-1) @ expand(v)
                    key_error[layer, index] = (out - exact)[..., reads, :].pow(2).sum() / norm
                    if layer == 0:
                        key_bytes[index] = nbytes
                else:
                    error = (exact_p * mask) @ expand(approx - v)
                    value_error[layer, index] = error[..., reads, :].pow(2).sum() / norm
                    if layer == 0:
                        value_bytes[index] = nbytes
        return exact.transpose(1, 2).contiguous().to(query.dtype), None

    name = "sketchcomm_layer_errors"
    AttentionInterface.register(name, attention)
    previous = getattr(model.config, "_attn_implementation")  # noqa: B009
    model.set_attn_implementation(name)
    try:
        model(input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    entries = input_ids.shape[0] * model.config.num_key_value_heads * held * block
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads
    )
    return LayerErrors(options, key_error, value_error, key_bytes, value_bytes, entries * head_dim)


def allocate(
    errors: LayerErrors,
    budget_bits: float,
    name: str,
    allowed: Callable[[str, GEARConfig], bool] | None = None,
) -> LayerRecipe:
    """Minimise ``Σ_l e_l(o_l)`` over the keys and values of every layer within a byte budget.

    Every tensor of every layer picks ``argmin_o e_l(o) + λ·bytes(o)``; ``λ`` is bisected to
    the smallest value whose recipe fits the budget.

    Args:
        errors: the statistic of :func:`layer_errors`.
        budget_bits: mean bits per compressed entry (keys and values together: codes, metadata,
            factors, as :func:`layer_errors` counted them).
        name: label of the recipe.
        allowed: optional ``(kind, option) -> bool`` restricting the options of keys or values.
    """
    layers = errors.key_error.shape[0]
    tables = {
        "key": (errors.key_error, errors.key_bytes),
        "value": (errors.value_error, errors.value_bytes),
    }
    budget_bytes = budget_bits / 8 * errors.entries * 2 * layers

    def pick(lam: float) -> tuple[dict[str, torch.Tensor], float]:
        chosen, spent = {}, 0.0
        for kind, (error, nbytes) in tables.items():
            usable = torch.tensor([allowed is None or allowed(kind, o) for o in errors.options])
            cost = (error + lam * nbytes[None, :]).masked_fill(~usable, math.inf)
            chosen[kind] = cost.argmin(-1)
            spent += nbytes[chosen[kind]].sum().item()
        return chosen, spent

    low, high = 0.0, 1e-12
    while pick(high)[1] > budget_bytes:
        if high > 1e6:
            raise ValueError(f"no recipe fits {budget_bits} bits per entry with these options")
        high *= 4
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if pick(middle)[1] > budget_bytes else (low, middle)
    chosen, _ = pick(high)
    keys = tuple(errors.options[i] for i in chosen["key"].tolist())
    values = tuple(errors.options[i] for i in chosen["value"].tolist())
    return LayerRecipe(name, keys, values)


def option_bits(errors: LayerErrors, index: int) -> float:
    """Mean bits per compressed entry of option ``index`` on keys and values together."""
    return 8 * (errors.key_bytes[index] + errors.value_bytes[index]).item() / (2 * errors.entries)


def allocation_options(bits: Sequence[int] = (2, 3, 4)) -> list[GEARConfig]:
    """Every bit width with key groups of 32 and 16 tokens, each without and with the default
    rank-1 key term (other settings default)."""
    options = []
    for b in bits:
        for group in (32, 16):
            config = GEARConfig(bits=b, group_size=group)
            options.extend([config.quantization_only(), config])
    return options


def recipe_config(recipe: LayerRecipe) -> GEARConfig:
    """``recipe`` as one library config: ``GEARConfig(per_layer=...)`` for ``GEARCache``."""
    overrides = {}
    for layer, (key, value) in enumerate(zip(recipe.keys, recipe.values, strict=True)):
        overrides[layer] = {
            "bits": value.bits,
            "key_bits": key.bits,
            "group_size": key.group_size,
            "value_group_size": value.group_size_for("value"),
            "rank": key.rank,
        }
    base = dataclasses.replace(recipe.values[0].quantization_only(), corrected="key")
    return GEARConfig(**{**dataclasses.asdict(base), "per_layer": overrides})


def equal_bytes_recipes(bits: int, layers: int) -> list[LayerRecipe]:
    """GEAR's default at ``bits`` and quantization-only recipes around its bytes.

    Quantization only spends GEAR's low-rank bytes on finer groups (key groups of 16 tokens and
    value groups of 32 channels hold exactly GEAR's bytes) or on float16 metadata.
    """
    gear = GEARConfig(bits=bits)
    quant = gear.quantization_only()
    variants = [
        quant,
        dataclasses.replace(quant, group_size=16),
        dataclasses.replace(quant, group_size=16, value_group_size=32),
        dataclasses.replace(quant, metadata="float16"),
    ]
    recipes = [LayerRecipe.uniform(gear, layers)]
    recipes += [LayerRecipe.uniform(v, layers) for v in variants]
    return recipes


def allocated_recipes(
    model,
    tokenizer,
    budgets: Sequence[float],
    log: Callable[[str], None],
    prefill: int = 512,
    tokens: int = 512,
) -> tuple[list[LayerRecipe], dict]:
    """Per-layer recipes within each budget (mean bits per compressed entry), from the
    calibration text.

    Two allocations per budget: one may use the low-rank key term, one may not (quantization
    only), so that their difference is what the low-rank term buys at equal bytes; the second
    is left out where it equals the first. The calibration segment is ``prefill + tokens + 1``
    tokens of the ``pydoc_data`` topics whatever length is evaluated: budgets are bits per
    entry, which do not depend on the length.
    """
    from sketchcomm.gear.loading import default_text

    calibration = text_segments(tokenizer, default_text(), 1, prefill + tokens + 1)
    options = allocation_options()
    log("calibration: per-layer errors")
    errors = layer_errors(model, calibration, prefill, options)
    recipes = []
    for budget in budgets:
        recipes.append(allocate(errors, budget, f"allocated {budget:.2f} b, low rank allowed"))
        quant = allocate(
            errors, budget, f"allocated {budget:.2f} b, quant-only", lambda kind, o: o.rank == 0
        )
        if (quant.keys, quant.values) != (recipes[-1].keys, recipes[-1].values):
            recipes.append(quant)
    statistic = {
        "options": [o.describe() for o in options],
        "option_bits": [option_bits(errors, i) for i in range(len(options))],
        "key_error": errors.key_error.tolist(),
        "value_error": errors.value_error.tolist(),
        "budgets": list(budgets),
        "recipes": [
            {
                "name": r.name,
                "keys": [c.describe() for c in r.keys],
                "values": [c.describe() for c in r.values],
                "config": recipe_config(r).describe(),
            }
            for r in recipes
        ],
    }
    return recipes, statistic


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.gear_layers``: the equal-bytes and per-layer tables."""
    from sketchcomm.gear.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=["equal-bytes", "allocate"], required=True)
    parser.add_argument("--bits", type=int, default=2, help="bits of the uniform recipes")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[2.77],
        help="mean bits per compressed entry of the allocated recipes (2.77: GEAR 2-bit's)",
    )
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only-allocated", action="store_true", help="leave out the uniform recipes"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    model, tokenizer = load_model(None, None, "float32")
    layers = model.config.num_hidden_layers
    statistic = None
    if args.study == "equal-bytes":
        recipes = equal_bytes_recipes(args.bits, layers)
    else:
        recipes, statistic = allocated_recipes(model, tokenizer, args.budgets, log)
        gear = GEARConfig(bits=args.bits)
        uniform = [gear, gear.quantization_only(), dataclasses.replace(gear, rank=0, group_size=16)]
        if not args.only_allocated:
            recipes = [LayerRecipe.uniform(c, layers) for c in uniform] + recipes
    points = []
    for name in args.texts:
        ids = text_segments(tokenizer, TEXTS[name](), 1, args.prefill + args.tokens + 1)
        reference = simulate(model, ids, args.prefill, 64, block_compressor(None, None)).perplexity
        for recipe in recipes:
            log(f"{name}: {recipe.describe()}")
            points.append(recipe_point(model, ids, args.prefill, recipe, name, reference))
            log(f"  {points[-1].increase:+.2f} % at {points[-1].compression:.2f}x")
    table = markdown_frontier(points)
    print(table)
    if args.json is not None:
        report = {
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "points": [
                {**dataclasses.asdict(p), "compression": p.compression, "increase": p.increase}
                for p in points
            ],
            "statistic": statistic,
            "markdown": table,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
