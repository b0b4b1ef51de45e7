"""Peak bytes of per-example tensors: the private hook's capture against Opacus.

A transformers GPT-2 (2 layers, 128 wide, byte vocabulary of 256, built from a config) trains as
a byte LM on one gloo rank under DDP with its default buckets and ``DPSketchState(unit="example",
compression=20)``. Every step records the most bytes of per-example rows and tables the hook's
contributions held at once (:attr:`~sketchcomm.privacy.contributions.ExampleContributions.
peak_bytes`): before the bucket layouts are stable (DDP rebuilds them after its first step) the
rows of a bucket are kept until it fires (``B x bucket``); once they are, each parameter's rows are
sketched into the bucket's tables as soon as they are captured and dropped (``B x largest layer +
B x tables``). Opacus's ``GradSampleModule`` on the same model and batch holds ``grad_sample`` for
every parameter (``B x all parameters``). Activations, which both keep, are not counted.

    python -m benchmarks.capture_memory            # batch 16 x 64 tokens
    python -m benchmarks.capture_memory --quick    # batch 4 x 16 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from opacus import GradSampleModule
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import GPT2Config, GPT2LMHeadModel

from sketchcomm.privacy import DPSketchState, PrivacyLedger

MIB = 1 << 20


class BytePositions(nn.Module):
    """GPT-2 logits for byte tokens ``[B, T]``, position ids passed as ``[B, T]``."""

    def __init__(self, layers: int, width: int, context: int) -> None:
        super().__init__()
        config = GPT2Config(
            n_layer=layers,
            n_embd=width,
            n_head=4,
            vocab_size=256,
            n_positions=context,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(config)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[-1]).expand(tokens.shape)
        return self.model(input_ids=tokens, position_ids=positions).logits


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def _batch(step: int, size: int, length: int) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(
        0, 256, (size, length + 1), generator=torch.Generator().manual_seed(step)
    )
    return tokens[:, :-1], tokens[:, 1:]


def sketch_capture(size: int, length: int, steps: int) -> list[dict]:
    """Per step: peak per-example bytes of the private hook, and whether it streamed."""
    folder = tempfile.mkdtemp()
    store = dist.FileStore(os.path.join(folder, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = DDP(BytePositions(2, 128, length))
        ledger = PrivacyLedger("rdp", 1e-5, unit="example")
        state = DPSketchState(
            ledger,
            max_grad_norm=1.0,
            unit="example",
            sample_rate=0.01,
            dataset_size=10_000,
            noise_multiplier=1.0,
            compression=20,
        )
        state.register(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        rows = []
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            state.contributions.reset_peak()
            tokens, targets = _batch(step, size, length)
            _loss(model(tokens), targets).backward()
            optimizer.step()
            tables = sum(b.sketch.rows * b.sketch.columns for b in state.buckets.values())
            rows.append(
                {
                    "step": step,
                    "streaming": state.contributions.streaming,
                    "peak_bytes": state.contributions.peak_bytes,
                    "buckets": len(state.buckets),
                    "table_bytes": size * tables * 4,
                }
            )
        return rows
    finally:
        dist.destroy_process_group()


def opacus_capture(size: int, length: int) -> dict:
    """Bytes of Opacus's ``grad_sample`` after one backward, and the largest layer's share."""
    model = GradSampleModule(BytePositions(2, 128, length))
    tokens, targets = _batch(0, size, length)
    _loss(model(tokens), targets).backward()
    params = list(model.parameters())
    held = sum(p.grad_sample.numel() * p.grad_sample.element_size() for p in params)
    return {"peak_bytes": held, "parameters": sum(p.numel() for p in params)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 x 16 tokens")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size, length = (4, 16) if args.quick else (16, 64)
    steps = 4  # DDP rebuilds its buckets after step 0; streaming from step 3
    sketch = sketch_capture(size, length, steps)
    opacus = opacus_capture(size, length)
    largest = max(p.numel() for p in BytePositions(2, 128, length).parameters())
    result = {
        "batch": size,
        "tokens": length,
        "largest_layer_bytes": size * largest * 4,
        "sketch": sketch,
        "opacus": opacus,
    }
    print(f"GPT-2 2 x 128, byte vocabulary, batch {size} x {length} tokens, compression 20")
    print(f"{'capture':44} {'peak per-example MiB':>20}")
    print(f"{'Opacus GradSampleModule':44} {opacus['peak_bytes'] / MIB:20.2f}")
    for row in sketch:
        path = "streamed" if row["streaming"] else "rows until the bucket fires"
        name = f"sketch, step {row['step']} ({path})"
        print(f"{name:44} {row['peak_bytes'] / MIB:20.2f}")
    print(
        f"B x largest layer {result['largest_layer_bytes'] / MIB:.2f} MiB, "
        f"B x tables {sketch[-1]['table_bytes'] / MIB:.2f} MiB"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
