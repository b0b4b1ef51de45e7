"""Per-example gradients from output tensor hooks, against torch.func per-sample gradients."""

# No "from __future__ import annotations": DDP checks the hook's bucket annotation at runtime.

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from opacus.layers import DPGRU, DPLSTM, DPMultiheadAttention
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.futures import Future
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from sketchcomm.privacy.capture import PerExampleGradients, compute_dtype

Loss = Callable[[Tensor, Tensor], Tensor]


def _projection_loss(output: Tensor, target: Tensor) -> Tensor:
    """Sums over examples; nonlinear in the output so that no gradient is trivially constant."""
    return (output * target).sum() + 0.5 * output.pow(2).sum()


def _reference(model: nn.Module, loss: Loss, x: Tensor, target: Tensor) -> dict[Tensor, Tensor]:
    """torch.func per-sample gradients of the whole model: vmap over examples of grad."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def example_loss(theta: dict[str, Tensor], xb: Tensor, tb: Tensor) -> Tensor:
        return loss(functional_call(model, theta, (xb.unsqueeze(0),)), tb.unsqueeze(0))

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, target)
    named = dict(model.named_parameters())
    return {named[n]: g.flatten(1) for n, g in grads.items()}


def _captured(model: nn.Module, loss: Loss, x: Tensor, target: Tensor) -> dict[Tensor, Tensor]:
    capture = PerExampleGradients(model)
    model.zero_grad()
    loss(model(x), target).backward()
    samples = {p: capture.pop(p) for p in model.parameters() if p.requires_grad}
    capture.remove()
    for p, rows in samples.items():  # the rows add up to the batch gradient
        torch.testing.assert_close(rows.sum(0), p.grad.flatten(), rtol=1e-5, atol=1e-5)
    return samples


def _assert_matches_torch_func(model: nn.Module, x: Tensor, loss: Loss = _projection_loss) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    captured = _captured(model, loss, x, target)
    expected = _reference(model, loss, x, target)
    assert captured.keys() == expected.keys() and captured
    for p, rows in captured.items():
        assert rows.shape == (len(x), p.numel())
        torch.testing.assert_close(rows, expected[p], rtol=1e-5, atol=1e-6)


class First(nn.Module):
    """The first output of a module that returns a tuple (recurrent and attention layers)."""

    def __init__(self, inner: nn.Module, self_attention: bool = False) -> None:
        super().__init__()
        self.inner, self.self_attention = inner, self_attention

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x, x, x)[0] if self.self_attention else self.inner(x)[0]


class Embed(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding, self.head = embedding, nn.Linear(embedding.embedding_dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embedding(x))


def _tokens(*shape: int) -> Tensor:
    tokens = torch.randint(0, 9, shape)
    tokens.view(-1)[::3] = 1  # the padding index appears
    return tokens


LAYERS = {
    "linear-2d": (lambda: nn.Linear(5, 3), (6, 5)),
    "linear-3d": (lambda: nn.Linear(5, 3), (6, 4, 5)),
    "conv1d-transposed-3d": (lambda: Conv1D(3, 5), (6, 4, 5)),
    "conv1d-transposed-2d": (lambda: Conv1D(3, 5), (6, 5)),
    "layernorm-2d": (lambda: nn.LayerNorm(5), (6, 5)),
    "layernorm-3d": (lambda: nn.LayerNorm(5), (6, 4, 5)),
    "rmsnorm-3d": (lambda: nn.RMSNorm(5), (6, 4, 5)),
    "groupnorm-3d": (lambda: nn.GroupNorm(2, 4), (6, 4, 5)),
    "groupnorm-4d": (lambda: nn.GroupNorm(2, 4), (6, 4, 3, 3)),
    "instancenorm1d": (lambda: nn.InstanceNorm1d(3, affine=True), (6, 3, 5)),
    "instancenorm2d": (lambda: nn.InstanceNorm2d(3, affine=True), (6, 3, 4, 4)),
    "instancenorm3d": (lambda: nn.InstanceNorm3d(2, affine=True), (6, 2, 3, 3, 3)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (6, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), (6, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2, stride=1, padding=1, dilation=2), (6, 2, 4, 4, 4)),
    "dplstm": (lambda: First(DPLSTM(5, 4, num_layers=2, batch_first=True)), (6, 4, 5)),
    "dpgru": (lambda: First(DPGRU(5, 4, batch_first=True)), (6, 4, 5)),
    "dpmha": (lambda: First(DPMultiheadAttention(8, 2, batch_first=True), True), (6, 4, 8)),
    "dpmha-bias-kv": (
        lambda: First(DPMultiheadAttention(8, 2, add_bias_kv=True, batch_first=True), True),
        (6, 4, 8),
    ),
    "prelu-torch-func": (lambda: nn.Sequential(nn.Linear(5, 3), nn.PReLU(3)), (6, 5)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layer_matches_torch_func(name: str) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    _assert_matches_torch_func(make(), torch.randn(*shape))


@pytest.mark.parametrize("shape", [(6,), (6, 4)], ids=["1d", "2d"])
def test_embedding_with_padding_matches_torch_func(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = Embed(nn.Embedding(9, 4, padding_idx=1))
    _assert_matches_torch_func(model, _tokens(*shape))


class TwiceAndTied(nn.Module):
    """A layer called twice, and an output layer sharing the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mix(torch.tanh(self.mix(self.embed(x)))))


def test_shared_and_tied_parameters_sum_every_use_per_example() -> None:
    torch.manual_seed(0)
    _assert_matches_torch_func(TwiceAndTied(), torch.randint(0, 7, (5, 3)))


def _gpt2() -> GPT2LMHeadModel:
    size = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}
    dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    tokens = {"bos_token_id": 0, "eos_token_id": 0}
    config = GPT2Config(**size, **dropout, **tokens, attn_implementation="eager")
    return GPT2LMHeadModel(config)


class PositionsGiven(nn.Module):
    """GPT-2 called with position ids of shape [B, T], returning the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[-1]).expand(tokens.shape)
        return self.model(input_ids=tokens, position_ids=positions).logits


def _token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def test_gpt2_with_tied_weights_matches_torch_func() -> None:
    torch.manual_seed(0)
    gpt2 = _gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    model = PositionsGiven(gpt2)
    tokens, targets = torch.randint(0, 64, (3, 6)), torch.randint(0, 64, (3, 6))
    captured = _captured(model, _token_loss, tokens, targets)
    expected = _reference(model, _token_loss, tokens, targets)
    assert captured.keys() == expected.keys()
    assert len(captured) == len(list(gpt2.parameters()))  # every parameter, the tied one once
    for p, rows in captured.items():
        torch.testing.assert_close(rows, expected[p], rtol=1e-5, atol=1e-6)


def test_gpt2_position_embedding_broadcast_over_the_batch_is_refused() -> None:
    gpt2 = _gpt2()
    PerExampleGradients(gpt2)
    with pytest.raises(ValueError, match=r"transformer\.wpe \(Embedding\).*position ids"):
        gpt2(input_ids=torch.randint(0, 64, (3, 6)))


def _check_bucket(state: tuple, bucket: dist.GradBucket) -> Future[Tensor]:
    """Pop each parameter's rows when DDP fires its bucket; they must add up to its gradient."""
    capture, errors = state
    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
        rows = capture.pop(p)
        errors.append(((rows.sum(0) - g.flatten()).abs().max() / g.abs().max()).item())
    done = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return done.then(lambda f: f.value()[0])


def ready_when_the_bucket_fires(rank: int, world: int) -> list[int]:
    torch.manual_seed(0)
    model = PositionsGiven(_gpt2())
    capture, errors = PerExampleGradients(model), []
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    ddp.register_comm_hook((capture, errors), _check_bucket)
    torch.manual_seed(1 + rank)
    popped = []
    for _ in range(3):  # DDP rebuilds its buckets in the order of the first backward
        ddp.zero_grad()
        tokens = torch.randint(0, 64, (3, 6))
        _token_loss(ddp(tokens), torch.randint(0, 64, (3, 6))).backward()
        popped.append(len(errors))
        if max(errors) > 1e-5:
            raise AssertionError(f"rows do not add up to the bucket's gradient: {max(errors)}")
    return popped


def test_rows_are_ready_when_ddp_fires_each_bucket_with_tied_weights() -> None:
    """Two gloo ranks, many buckets: every parameter, the tied embedding included, has its
    complete per-example rows when its bucket's communication hook runs."""
    n_params = len(list(_gpt2().parameters()))
    for popped in run_ranks(ready_when_the_bucket_fires, 2):
        assert popped == [n_params, 2 * n_params, 3 * n_params]


def test_small_cnn_matches_torch_func() -> None:
    torch.manual_seed(0)
    features = [nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU()]
    model = nn.Sequential(*features, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
    _assert_matches_torch_func(model, torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize(
    "make, batch",
    [
        (lambda: nn.Linear(5, 3), torch.randn(0, 4, 5)),
        (lambda: Embed(nn.Embedding(9, 4, padding_idx=1)), torch.zeros(0, 4, dtype=torch.long)),
        (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3)), torch.randn(0, 2, 5, 5)),
        (lambda: nn.Sequential(nn.LayerNorm(5), nn.PReLU()), torch.randn(0, 5)),
    ],
    ids=["linear", "embedding", "conv-groupnorm", "layernorm-prelu"],
)
def test_an_empty_batch_gives_zero_rows(make: Callable[[], nn.Module], batch: Tensor) -> None:
    model = make()
    capture = PerExampleGradients(model)
    model(batch).sum().backward()
    for p in model.parameters():
        assert capture.pop(p).shape == (0, p.numel())


def test_bf16_autocast_captures_in_float32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    capture = PerExampleGradients(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(5, 4, 6))
    out.float().pow(2).sum().backward()
    for p in model.parameters():
        rows = capture.pop(p)
        assert rows.dtype == torch.float32
        torch.testing.assert_close(rows.sum(0), p.grad.flatten(), rtol=2e-2, atol=2e-2)


def test_a_new_forward_starts_afresh_and_evaluation_captures_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    capture = PerExampleGradients(model)
    x = torch.randn(7, 6)
    model(x[:4]).sum().backward()  # samples never consumed, as after a failed step ...
    model.zero_grad()
    model(x).sum().backward()  # ... must not leak into the next backward
    assert capture.held_bytes() == 7 * (30 + 5 + 15 + 3) * 4
    assert capture.pop(model[0].weight).shape == (7, 30)
    assert capture.held_bytes() == 7 * (5 + 15 + 3) * 4
    capture.clear()
    assert capture.held_bytes() == 0
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        capture.pop(model[2].weight)
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        capture.pop(model[0].weight)


def test_frozen_layers_are_not_captured() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    capture = PerExampleGradients(model)
    model(torch.randn(3, 4)).sum().backward()
    assert capture.pop(model[1].weight).shape == (3, 8)
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        capture.pop(model[0].weight)


def test_a_receiver_gets_each_use_with_its_forward_and_autocast_dtype() -> None:
    """With a receiver nothing is kept: every use's rows go to it, tagged with their forward
    pass (micro-batches stay apart) and the lowest precision that produced them."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    received = []
    capture = PerExampleGradients(model, receiver=lambda p, rows, i, d: received.append((i, d)))
    model(torch.randn(4, 6)).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, 6))
    out.float().sum().backward()
    assert capture.held_bytes() == 0
    assert sorted(received, key=str) == sorted(
        [(0, torch.float32)] * 4 + [(1, torch.bfloat16)] * 4, key=str
    )
    assert compute_dtype(torch.zeros(2, dtype=torch.float16)) == torch.float16
