"""Private training of a transformers GPT-2 as a byte-level language model, example-level
(epsilon, delta)-DP, on two ranks with the private sketch hook.

    torchrun --standalone --nproc_per_node=2 examples/train_private_lm.py --target-epsilon 8

The model is built from a ``GPT2Config`` (no download): vocabulary 256 (the bytes of UTF-8 text),
``--layers`` blocks of width ``--width`` with ``--heads`` heads, context ``--context``; its
``lm_head`` is tied to the token embedding. The text is Python's own help topics
(``pydoc_data.topics.topics``, about 465k characters), cut into non-overlapping sequences of
``context + 1`` bytes; one sequence is one *example* (the privacy unit), its loss the mean
next-byte cross-entropy over its positions. A seeded tenth of the sequences is held out.
Position ids are passed as ``[B, T]`` so that every layer's rows are examples. ``--mode opacus``
(one process, no torchrun) and ``--mode allreduce`` train the same model on the same data as
baselines; see ``examples/private_run.py``. Threat model and accountant: the aggregate released each
step is (epsilon, delta)-DP for one sequence under the RDP accountant with Poisson sampling.
"""

from __future__ import annotations

import argparse
import sys
from pydoc_data.topics import topics

import private_run
import torch
from torch import nn
from torch.nn import functional as F

HELD_OUT = 0.1
EVAL_SEQUENCES = 256  # held-out sequences the eval loss is measured on


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    private_run.add_arguments(parser, steps=300, batch=128, lr=0.5)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--width", type=int, default=128, help="embedding width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--context", type=int, default=64, help="bytes per sequence")
    return parser


def byte_sequences(context: int) -> torch.Tensor:
    """The help topics as UTF-8 bytes, cut into ``[S, context + 1]`` non-overlapping rows."""
    data = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    count = len(tokens) // (context + 1)
    return tokens[: count * (context + 1)].view(count, context + 1)


def build_task(args: argparse.Namespace) -> private_run.Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.tiny:
        args.layers, args.width, args.heads, args.context = 1, 32, 2, 16
    sequences = byte_sequences(args.context)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(args.seed))
    held = int(HELD_OUT * len(sequences))
    train, held_out = sequences[order[held:]], sequences[order[:held]][:EVAL_SEQUENCES]
    if args.tiny:
        train = train[:2048]
    config = GPT2Config(
        vocab_size=256,
        n_positions=args.context,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )

    def build_model() -> nn.Module:
        torch.manual_seed(args.seed)
        return GPT2LMHeadModel(config)

    def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B]``: each sequence's mean next-byte cross-entropy (``x``, ``y``: ``[B, T]``)."""
        batch, length = x.shape
        positions = torch.arange(length).expand(batch, length)
        logits = model(input_ids=x, position_ids=positions).logits
        losses = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="none")
        return losses.view(batch, length).mean(dim=1)

    def metrics(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            x, y = held_out[:, :-1], held_out[:, 1:]
            return {"eval_loss": example_losses(model, x, y).mean().item()}

    return private_run.Task(build_model, train[:, :-1], train[:, 1:], example_losses, metrics)


if __name__ == "__main__":
    sys.exit(private_run.main(build_parser().parse_args(), build_task))
