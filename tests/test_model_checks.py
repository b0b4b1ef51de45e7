"""Models whose rows would not be examples, or whose buffers leave unnoised, are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from opacus.layers import DPLSTM, DPMultiheadAttention
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from sketchcomm.privacy.capture import PerExampleGradients
from sketchcomm.privacy.model_checks import BufferWatch, validate_private_model


class Wrapped(nn.Module):
    """Applies ``layer`` after ``reshape``: the reshape decides what the layer's rows are."""

    def __init__(self, layer: nn.Module, reshape: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.layer, self.reshape = layer, reshape

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.reshape(x))


@pytest.mark.parametrize(
    "reshape, accepted",
    [(lambda x: x.reshape(-1, x.shape[-1]), (3, 1, 4)), (lambda x: x.transpose(0, 1), None)],
    ids=["tokens-folded-into-batch", "time-major"],
)
def test_a_layer_whose_rows_are_not_examples_is_refused_in_the_forward(
    reshape: Callable, accepted: tuple[int, ...] | None
) -> None:
    model = Wrapped(nn.Linear(4, 2), reshape)
    capture = PerExampleGradients(model)
    with pytest.raises(ValueError, match=r"layer \(Linear\) gets a tensor of shape .*reshape\(B"):
        model(torch.randn(3, 5, 4))
    with pytest.raises(RuntimeError, match="no per-example gradient"):
        capture.pop(model.layer.weight)  # refused before anything was captured
    if accepted is not None:  # rows are examples here
        model(torch.randn(*accepted)).sum().backward()
        assert capture.pop(model.layer.weight).shape == (3, 8)


TIME_MAJOR = {
    "rnn": lambda: nn.RNN(4, 4),
    "lstm": lambda: nn.LSTM(4, 4),
    "gru": lambda: nn.GRU(4, 4),
    "multihead-attention": lambda: nn.MultiheadAttention(4, 2),
    "transformer-encoder-layer": lambda: nn.TransformerEncoderLayer(4, 2, 8),
    "dplstm": lambda: DPLSTM(4, 4),
    "dp-multihead-attention": lambda: DPMultiheadAttention(4, 2),
}


@pytest.mark.parametrize("name", sorted(TIME_MAJOR))
def test_time_major_modules_are_refused_even_when_frozen(name: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), TIME_MAJOR[name]())
    model[1].requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"1(\.self_attn)? \(\w+\) is time-major .*batch_first=True"
    ):
        PerExampleGradients(model)
    with pytest.raises(ValueError, match="time-major"):
        validate_private_model(model, "example", broadcast_buffers=False)


MIXING = {
    "batchnorm-without-parameters": (lambda: nn.BatchNorm1d(4, affine=False), "GroupNorm"),
    "frozen-batchnorm": (lambda: nn.BatchNorm1d(4).requires_grad_(False), "ModuleValidator.fix"),
    "sync-batchnorm": (lambda: nn.SyncBatchNorm(4), "batch statistics"),
    "instancenorm-running-stats": (
        lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
        "track_running_stats=False",
    ),
    "embedding-scaled-by-frequency": (
        lambda: nn.Embedding(4, 4, scale_grad_by_freq=True),
        "scale_grad_by_freq=False",
    ),
    "lstm-for-opacus": (lambda: nn.LSTM(4, 4, batch_first=True), "DPLSTM"),
}


@pytest.mark.parametrize("name", sorted(MIXING))
def test_modules_that_mix_examples_are_refused_with_the_fix(name: str) -> None:
    make, remedy = MIXING[name]
    model = nn.Sequential(nn.Linear(4, 4), make())
    with pytest.raises(ValueError, match=rf"- 1 \(\w+\) .*{remedy}"):
        PerExampleGradients(model)
    with pytest.raises(ValueError, match=remedy):
        validate_private_model(model, "example", broadcast_buffers=False)


def test_running_statistics_are_refused_when_broadcast_or_per_example() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    validate_private_model(model, "rank", broadcast_buffers=False)  # they stay on each rank
    with pytest.raises(ValueError, match=r"1\.running_mean .*broadcast_buffers=False"):
        validate_private_model(model, "rank", broadcast_buffers=True)
    with pytest.raises(ValueError, match=r"observer sees.*GroupNorm/LayerNorm"):
        validate_private_model(model, "example", broadcast_buffers=False)


def _gpt2() -> GPT2LMHeadModel:
    size = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}
    return GPT2LMHeadModel(GPT2Config(**size, bos_token_id=0, eos_token_id=0))


def test_transformers_gpt2_and_a_groupnorm_cnn_are_accepted() -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    for model in (_gpt2(), cnn):
        validate_private_model(model, "example", broadcast_buffers=True)
        PerExampleGradients(model)


class Buffers(nn.Module):
    """A running average the forward updates, and buffers that never change."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.register_buffer("average", torch.zeros(4))
        self.register_buffer("inv_freq", 1.0 / 10_000 ** (torch.arange(0, 4, 2) / 4))
        self.register_buffer("causal", torch.ones(4, 4, dtype=torch.bool).tril())
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.update_average = True

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1  # an integer buffer: not data
        if self.update_average:
            with torch.no_grad():
                self.average.mul_(0.9).add_(0.1 * x.mean(0))
        return self.layer(x) * self.inv_freq.repeat(2) + self.causal[0]


def test_buffer_watch_finds_buffers_that_change_in_training() -> None:
    model = Buffers()
    watch = BufferWatch(model)
    model(torch.randn(3, 4))
    assert watch.changed() == ["average"]
    watch.refuse_changed("rank", broadcast_buffers=False)
    with pytest.raises(ValueError, match=r"\(average\).*broadcast_buffers=False"):
        watch.refuse_changed("rank", broadcast_buffers=True)
    with pytest.raises(ValueError, match="observer sees"):
        watch.refuse_changed("example", broadcast_buffers=False)


def test_buffers_that_never_change_are_accepted() -> None:
    model = Buffers()
    model.update_average = False
    gpt2 = _gpt2()
    watches = [BufferWatch(model), BufferWatch(gpt2)]
    model(torch.randn(3, 4))
    gpt2(torch.randint(0, 64, (2, 5)))
    for watch in watches:
        assert watch.changed() == []
        watch.refuse_changed("example", broadcast_buffers=True)


class Scalar(nn.Module):
    """No Opacus sampler, and ``.item()`` leaves torch.func nothing to differentiate."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale * x.abs().max().item()


class Centred(nn.Module):
    """No Opacus sampler; subtracting the batch mean mixes examples."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(0)) * self.scale


class Noisy(nn.Module):
    """No Opacus sampler; dropout makes each example's output random."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.dropout(x * self.scale, 0.5)


class Paired(nn.Module):
    """Trainable parameters of its own, but a tuple output: no tensor to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.scale, x


@pytest.mark.parametrize(
    "module, message",
    [
        (Scalar(), r"Scalar has no Opacus grad sampler and torch.func cannot compute"),
        (Centred(), r"Centred has no Opacus grad sampler .* mixes examples"),
        (Noisy(), r"Noisy has no Opacus grad sampler and torch.func cannot"),
        (Paired(), r"returns tuple, not one tensor"),
    ],
    ids=["item", "batch-mean", "dropout", "tuple-output"],
)
def test_a_module_with_neither_sampler_nor_torch_func_path_is_refused(
    module: nn.Module, message: str
) -> None:
    model = nn.Sequential(nn.Linear(4, 4), module)
    PerExampleGradients(model)
    with pytest.raises(ValueError, match=rf"^1 \({type(module).__name__}\)"):
        model(torch.randn(3, 4))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(3, 4))


def test_a_forward_without_a_batch_tensor_is_refused() -> None:
    class FromDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def forward(self, batch: dict[str, Tensor]) -> Tensor:
            return self.layer(batch["x"])

    model = FromDict()
    PerExampleGradients(model)
    with pytest.raises(ValueError, match="no tensor to take the batch size from"):
        model({"x": torch.randn(3, 4)})
