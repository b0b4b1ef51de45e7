"""Private DDP steps on real gloo ranks with unit="example", and their one-process reference.

``private_worker(rank, world, spec)`` trains nothing: it runs ``spec["steps"]`` logical steps of
``spec["micro"]`` micro-batches (all but the last under ``no_sync``) on a fixed model, with
``noise_multiplier=0``, and records every bucket's clipped sum just before release (the state's
public ``add_noise`` receives it). ``reference_release`` computes the same sums in one process
from ``torch.func`` per-example gradients of the whole model (``functional_call`` + ``vmap(grad)``,
tied weights tied), sketched with each bucket's sketch, clipped to ``C_b`` and summed over every
example of every rank.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import GPT2Config, GPT2LMHeadModel

from sketchcomm.demo.digits import make_mlp
from sketchcomm.privacy import DPSketchState, PrivacyLedger


def gpt2() -> GPT2LMHeadModel:
    """A tiny GPT-2 (tied lm_head), deterministic from seed 0, no dropout."""
    torch.manual_seed(0)
    size = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}
    dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    tokens = {"bos_token_id": 0, "eos_token_id": 0}
    config = GPT2Config(**size, **dropout, **tokens, attn_implementation="eager")
    return GPT2LMHeadModel(config)


class PositionsGiven(nn.Module):
    """GPT-2 called with position ids [B, T], so that every layer's rows are examples."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[-1]).expand(tokens.shape)
        return self.model(input_ids=tokens, position_ids=positions).logits


def make_model(name: str) -> nn.Module:
    return PositionsGiven(gpt2()) if name == "gpt2" else make_mlp(hidden=32, seed=3)


def summed_loss(name: str, output: Tensor, target: Tensor) -> Tensor:
    if name == "gpt2":
        output, target = output.flatten(0, -2), target.flatten()
    return nn.functional.cross_entropy(output.float(), target, reduction="sum")


def batch(name: str, step: int, rank: int, micro: int, size: int) -> tuple[Tensor, Tensor]:
    """The examples of one micro-batch, the same in every process."""
    generator = torch.Generator().manual_seed(1000 * step + 100 * rank + micro)
    if name == "gpt2":
        tokens = torch.randint(0, 64, (size, 2, 8), generator=generator)
        return tokens[:, 0], tokens[:, 1]
    return torch.randn(size, 64, generator=generator), torch.randint(
        0, 10, (size,), generator=generator
    )


class RecordingState(DPSketchState):
    """Records the clipped sum each bucket is about to release."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.released: list[Tensor] = []

    def add_noise(self, values: Tensor, std: float) -> Tensor:
        self.released.append(values.clone())
        return super().add_noise(values, std)


def private_worker(rank: int, world: int, spec: dict) -> dict:
    name = spec["model"]
    model = DDP(make_model(name), bucket_cap_mb=spec["bucket_cap_mb"])
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, unit="example")
    state = RecordingState(
        ledger,
        max_grad_norm=spec["clip"],
        unit="example",
        sample_rate=0.01,
        dataset_size=10_000,
        noise_multiplier=0.0,
        compression=spec["compression"],
        rows=3,
        recovery="dense",
        min_compression_size=spec["min_compression_size"],
    )
    state.register(model)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if spec.get("autocast") else nullcontext()
    )
    steps = []
    for step in range(spec["steps"]):
        model.zero_grad(set_to_none=True)
        state.released = []
        for micro in range(spec["micro"]):
            x, y = batch(name, step, rank, micro, spec["size"])
            last = micro == spec["micro"] - 1
            with nullcontext() if last else model.no_sync(), autocast:
                loss = summed_loss(name, model(x), y)
            loss.backward()
        buckets = [state.buckets[i] for i in sorted(state.buckets)]
        steps.append(
            {
                "released": state.released,
                "layouts": [b.layout for b in buckets],
                "sketches": [b.sketch for b in buckets],
                "clips": [state.bucket_clip_norm(b.sketch.dim) for b in buckets],
                "streaming": state.contributions.streaming,
                "held_after": state.contributions.held_bytes(),
            }
        )
    return {"steps": steps, "ledger_steps": ledger.steps}


def per_example_gradients(name: str, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    """``[B, numel]`` per-example gradients of every parameter (``model.parameters()`` order)."""
    model = make_model(name)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(values: dict, x: Tensor, y: Tensor) -> Tensor:
        return summed_loss(name, functional_call(model, values, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    return [grads[k].flatten(1) for k in params]


def reference_release(
    spec: dict, result: dict, step: int, world: int, *, clipped: bool = True
) -> list[Tensor]:
    """Each bucket's sum over all examples of all ranks of ``clip_{C_b}(S_b(g_i))`` (of
    ``S_b(g_i)`` without ``clipped``)."""
    name = spec["model"]
    examples = [
        batch(name, step, rank, micro, spec["size"])
        for rank in range(world)
        for micro in range(spec["micro"])
    ]
    inputs = torch.cat([x for x, _ in examples])
    targets = torch.cat([y for _, y in examples])
    grads = per_example_gradients(name, inputs, targets)
    released = []
    for layout, sketch, clip in zip(
        result["layouts"], result["sketches"], result["clips"], strict=True
    ):
        rows = torch.cat([grads[position] for position in layout[1]], 1)
        tables = sketch.sketch_batch(rows)
        norms = tables.flatten(1).norm(dim=1)
        factors = (clip / (norms + 1e-6)).clamp(max=1.0) if clipped else torch.ones_like(norms)
        released.append(torch.einsum("n,nrc->rc", factors, tables))
    return released
