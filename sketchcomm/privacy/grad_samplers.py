r"""Per-example gradient functions: Opacus's registered grad samplers, plus what Opacus lacks.

A grad sampler maps a layer, its inputs ``activations`` (a list, batch in dim 0) and the gradient
of the loss with respect to its output ``backprops`` (batch in dim 0) to
``{parameter: [B, *parameter.shape]}``. Opacus registers one per layer type in
`opacus.grad_sample.GradSampleModule.GRAD_SAMPLERS`;
[`grad_sampler()`][sketchcomm.privacy.grad_samplers.grad_sampler] looks a module's exact type up
there and in [`EXTRA_GRAD_SAMPLERS`][sketchcomm.privacy.grad_samplers.EXTRA_GRAD_SAMPLERS] (this
module's samplers), and wraps two layer-specific corrections:

* ``nn.Embedding(padding_idx=p)``: autograd never updates row ``p``, Opacus's sampler does; the
  row is zeroed;
* Opacus's ``SequenceBias`` (inside ``DPMultiheadAttention``) is time-major unless built with
  ``batch_first=True``: its activations and backprops are moved to batch-first first.

[`functional_grad_sample()`][sketchcomm.privacy.grad_samplers.functional_grad_sample] is the
fallback for a type with no sampler: ``torch.func``'s ``vmap`` of ``grad`` of `\langle
f_\theta(x_b), g_b\rangle` over the examples ``b``, which is example ``b``'s gradient when the
module treats examples independently
([`functional_outputs_match()`][sketchcomm.privacy.grad_samplers.functional_outputs_match] checks
that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.layers.dp_multihead_attention import SequenceBias
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "EXTRA_GRAD_SAMPLERS",
    "GradSampler",
    "functional_grad_sample",
    "functional_outputs_match",
    "grad_sampler",
    "transposed_linear_grad_sample",
]

GradSampler = Callable[[nn.Module, list[Tensor], Tensor], dict[Tensor, Tensor]]


def transposed_linear_grad_sample(
    layer: nn.Module, activations: list[Tensor], backprops: Tensor
) -> dict[Tensor, Tensor]:
    r"""``y = x W + b`` with ``W`` of shape ``[in, out]`` (transformers' GPT-2 ``Conv1D``).

    For input ``a`` ``[B, ..., in]`` and output gradient ``g`` ``[B, ..., out]``:
    `∇_W ℓ_b = Σ_t a_{b,t} g_{b,t}^ᵀ` (``[in, out]``),
    `∇_b ℓ_b = Σ_t g_{b,t}`.

    >>> layer = nn.Linear(3, 2)  # any module with weight [in, out] and bias [out]
    >>> layer.weight = nn.Parameter(torch.randn(3, 2))
    >>> samples = transposed_linear_grad_sample(layer, [torch.randn(4, 3)], torch.randn(4, 2))
    >>> samples[layer.weight].shape
    torch.Size([4, 3, 2])
    """
    activation = activations[0].to(backprops.dtype)
    samples = {}
    if layer.weight.requires_grad:
        samples[layer.weight] = torch.einsum("n...i,n...o->nio", activation, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        samples[layer.bias] = torch.einsum("n...o->no", backprops)
    return samples


def _extra_grad_samplers() -> dict[type[nn.Module], GradSampler]:
    samplers: dict[type[nn.Module], GradSampler] = {}
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return samplers
    samplers[Conv1D] = transposed_linear_grad_sample
    return samplers


EXTRA_GRAD_SAMPLERS: Mapping[type[nn.Module], GradSampler] = _extra_grad_samplers()


def _embedding(sampler: GradSampler) -> GradSampler:
    def sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
        samples = sampler(layer, activations, backprops)
        if layer.padding_idx is not None and layer.weight in samples:
            samples[layer.weight][:, layer.padding_idx] = 0
        return samples

    return sample


def _sequence_bias(sampler: GradSampler) -> GradSampler:
    def sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
        if not layer.batch_first:
            activations = [a.transpose(0, 1) for a in activations]
            backprops = backprops.transpose(0, 1)
        return sampler(layer, activations, backprops)

    return sample


def grad_sampler(module: nn.Module) -> GradSampler | None:
    """The grad sampler registered for ``type(module)`` (exact type), or ``None``.

    >>> grad_sampler(nn.Linear(2, 2)) is not None, grad_sampler(nn.PReLU()) is None
    (True, True)
    """
    kind = type(module)
    sampler = EXTRA_GRAD_SAMPLERS.get(kind) or GradSampleModule.GRAD_SAMPLERS.get(kind)
    if sampler is None:
        return None
    if isinstance(module, nn.Embedding):
        return _embedding(sampler)
    if isinstance(module, SequenceBias):
        return _sequence_bias(sampler)
    return sampler


def _batched(args: tuple[Any, ...]) -> tuple[int | None, ...]:
    return tuple(0 if isinstance(a, Tensor) else None for a in args)


def functional_outputs_match(
    module: nn.Module,
    params: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Tensor,
) -> bool:
    """Whether running ``module`` on each example alone reproduces its batched ``output``.

    Tensor arguments carry the batch in dim 0; ``kwargs`` (no tensors) are passed as they are.
    False means the module mixes examples (or is
    random); an exception means ``torch.func`` cannot run it.
    """

    def one_example(*example: Any) -> Tensor:
        single = tuple(a.unsqueeze(0) if isinstance(a, Tensor) else a for a in example)
        return functional_call(module, params, single, kwargs).squeeze(0)

    with torch.no_grad():
        alone = vmap(one_example, in_dims=_batched(args), randomness="error")(*args)
    expected = output.detach()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return alone.shape == expected.shape and torch.allclose(
        alone.to(expected.dtype), expected, rtol=1e-4, atol=1e-5 * (scale + 1e-30)
    )


def functional_grad_sample(
    module: nn.Module,
    params: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    backprops: Tensor,
) -> dict[str, Tensor]:
    r"""Per-example gradients ``{name: [B, *shape]}`` of ``module``'s parameters ``params``.

    ``vmap`` over ``b`` of ``grad`` of `⟨f_θ(x_b), g_b⟩`; tensor
    arguments and ``backprops`` carry the batch in dim 0, ``kwargs`` (no tensors) are passed as
    they are; parameters not in ``params`` (and every
    submodule's) are held fixed.

    >>> layer = nn.PReLU()
    >>> x, g = torch.randn(5, 3), torch.randn(5, 3)
    >>> samples = functional_grad_sample(layer, {"weight": layer.weight}, (x,), {}, g)
    >>> samples["weight"].shape
    torch.Size([5, 1])
    """
    detached = {name: p.detach() for name, p in params.items()}

    def inner_product(theta: dict[str, Tensor], g: Tensor, *example: Any) -> Tensor:
        single = tuple(a.unsqueeze(0) if isinstance(a, Tensor) else a for a in example)
        return (functional_call(module, theta, single, kwargs) * g.unsqueeze(0)).sum()

    per_example = vmap(grad(inner_product), in_dims=(None, 0, *_batched(args)))
    return per_example(detached, backprops, *args)
