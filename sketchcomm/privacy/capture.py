r"""Per-example gradients that are ready when DDP fires a gradient bucket.

DDP calls its communication hook for a bucket as soon as the gradients of the bucket's parameters
have been accumulated. Per-example gradients computed by module-level backward hooks (as Opacus's
``GradSampleModule`` does) may not exist yet at that moment. A hook on the module's *output
tensor* runs when the gradient with respect to that output is known, which is before the module's
backward computes, and accumulates, its parameters' gradients. So every module with trainable
parameters of its own gets a forward hook that records its inputs and attaches a tensor hook to
its output; that tensor hook computes the module's per-example gradients from the inputs ``a``
and the output gradient ``g`` (for a loss that *sums* over examples), e.g. for ``nn.Linear``

.. math::

    \nabla_W \ell_b = \sum_t g_{b,t} a_{b,t}^\top, \qquad \nabla_{bias} \ell_b = \sum_t g_{b,t},

with Opacus's registered grad sampler for the module's type
(:func:`~sketchcomm.privacy.grad_samplers.grad_sampler`: ``Linear``, ``Embedding``,
``Conv1d/2d/3d``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm*``, the
``RNNLinear`` and ``SequenceBias`` inside ``DPLSTM``/``DPGRU``/``DPMultiheadAttention``; and
transformers' GPT-2 ``Conv1D``), or else ``torch.func`` (vmap of grad over the module), in
float32 even under autocast.
A parameter used several times (a tied ``lm_head``, a module called twice) gets the sum of its
uses, per example: autograd accumulates its gradient only after every use's output hook has run.

Rows must be examples. The model's forward pre-hook records the batch size ``B`` (dim 0 of the
first tensor argument, or of ``input_ids``/``inputs_embeds``), and a module whose input or output
has a leading dimension other than ``B`` is refused in its forward hook, before any backward.
Modules that mix examples (batch statistics, time-major layers) are refused at construction
(:func:`~sketchcomm.privacy.model_checks.example_mixing_problems`); a module on the ``torch.func``
path is run on each example alone in its forward hook and refused unless that reproduces its
batched output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.layers.dp_multihead_attention import SequenceBias
from torch import Tensor, nn

from sketchcomm.privacy.grad_samplers import (
    functional_grad_sample,
    functional_outputs_match,
    grad_sampler,
)
from sketchcomm.privacy.model_checks import example_mixing_problems

__all__ = ["PerExampleGradients", "Receiver", "compute_dtype"]

#: ``receiver(param, rows, forward, dtype)``: a use's per-example gradients ``[B, numel]`` of
#: ``param`` (float32) from the ``forward``-th forward pass, computed by a forward in ``dtype``.
Receiver = Callable[[Tensor, Tensor, int, torch.dtype], None]

BATCH_KEYWORDS = ("input_ids", "inputs_embeds")
ROWS_FIX = (
    "keep the batch in dim 0 of every layer's input: do not fold tokens into the batch "
    "(reshape(B * T, d)), build recurrent and attention layers with batch_first=True, and pass "
    "position ids expanded to [B, T] (e.g. position_ids=torch.arange(T).expand(B, T))"
)


def _at_least_fp32(tensor: Any) -> Any:
    """Floating-point tensors below float32 (bf16, fp16) are promoted to float32."""
    if isinstance(tensor, Tensor) and tensor.is_floating_point():
        return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
    return tensor


def compute_dtype(output: Tensor) -> torch.dtype:
    """The lowest precision that produced ``output``: the autocast dtype when autocast is on for
    its device during the forward, else its own dtype (whichever has the larger epsilon)."""
    dtypes = [output.dtype if output.is_floating_point() else torch.float32]
    if torch.is_autocast_enabled(output.device.type):
        dtypes.append(torch.get_autocast_dtype(output.device.type))
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (*args, *(kwargs.get(k) for k in BATCH_KEYWORDS)):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class PerExampleGradients:
    """Captures per-example gradients of every trainable parameter of ``model``.

    Raises ``ValueError`` at construction for a module whose rows would not be examples (see
    :mod:`sketchcomm.privacy.model_checks`), and in the forward pass, before any backward, for a
    module whose leading dimension is not the batch's or whose per-example gradients neither an
    Opacus grad sampler nor ``torch.func`` can compute (naming the module). After a backward
    pass, :meth:`pop` returns a parameter's per-example gradients as ``[B, numel]`` (``B`` may be
    0 for an empty batch), summed over its uses; a new forward pass drops what was not popped.
    With a ``receiver`` (see :data:`Receiver`) nothing is kept: every use's rows are handed to it
    as soon as they are computed, tagged with the index of their forward pass (counted from 0 over
    the forward passes run with gradients enabled), so that micro-batches stay apart.

    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    >>> capture = PerExampleGradients(model)
    >>> model(torch.randint(0, 10, (5, 7))).sum().backward()
    >>> capture.pop(model[0].weight).shape
    torch.Size([5, 40])
    """

    def __init__(self, model: nn.Module, receiver: Receiver | None = None) -> None:
        problems = example_mixing_problems(model)
        if problems:
            raise ValueError(
                "per-example rows would not be single examples:\n- " + "\n- ".join(problems)
            )
        self._names = {module: name or "<model>" for name, module in model.named_modules()}
        self._samples: dict[Tensor, Tensor] = {}
        self._batch: int | None = None
        self.receiver = receiver
        self.forwards = 0  # forward passes with gradients enabled
        self._replaying = False  # torch.func re-runs a module: its submodules' hooks stand by
        # Without a receiver, a new forward pass starts a new set of samples, even if the last
        # backward failed.
        self._handles = [model.register_forward_pre_hook(self._start_forward, with_kwargs=True)]
        # A module's own parameters: not also a submodule's (Opacus's DP RNNs re-register
        # their cells' parameters under their own names).
        self._own: dict[nn.Module, dict[str, Tensor]] = {}
        for module in model.modules():
            inner = {p for child in module.children() for p in child.parameters()}
            own = {n: p for n, p in module.named_parameters(recurse=False) if p not in inner}
            if own:
                self._own[module] = own
        self._handles += [
            module.register_forward_hook(self._forward_hook, with_kwargs=True)
            for module in self._own
        ]

    def _start_forward(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._replaying:
            self._samples.clear()
            self._batch = _batch_size(args, kwargs)
            if torch.is_grad_enabled():
                self.forwards += 1

    def _label(self, module: nn.Module) -> str:
        return f"{self._names.get(module, '<unregistered>')} ({type(module).__name__})"

    def _check_rows(self, module: nn.Module, tensors: list[Tensor]) -> None:
        if self._batch is None:
            raise ValueError(
                f"{self._label(module)} ran, but the model's forward got no tensor to take the "
                "batch size from: pass the batch as the first tensor argument (or input_ids / "
                "inputs_embeds), through the registered model"
            )
        dim = 1 if isinstance(module, SequenceBias) and not module.batch_first else 0
        for tensor in tensors:
            if tensor.dim() <= dim or tensor.shape[dim] != self._batch:
                raise ValueError(
                    f"{self._label(module)} gets a tensor of shape {tuple(tensor.shape)} while "
                    f"the batch has {self._batch} examples, so its per-example rows would not be "
                    f"examples: {ROWS_FIX}"
                )

    def _forward_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._replaying:
            return
        params = {n: p for n, p in self._own[module].items() if p.requires_grad}
        if not params or not torch.is_grad_enabled():
            return  # evaluation or frozen: nothing to differentiate
        if not isinstance(output, Tensor):
            raise ValueError(
                f"{self._label(module)} has trainable parameters and returns "
                f"{type(output).__name__}, not one tensor: per-example capture cannot hook it; "
                "freeze its parameters or use its Opacus DP replacement "
                "(opacus.validators.ModuleValidator.fix(model))"
            )
        if not output.requires_grad:
            return
        sampler = grad_sampler(module)
        inputs = args if args or sampler is None else tuple(kwargs.values())
        self._check_rows(module, [a for a in inputs if isinstance(a, Tensor)] + [output])
        inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in inputs)
        if sampler is None and self._batch:
            self._probe(module, params, inputs, kwargs, output)
        batch, forward, dtype = self._batch, self.forwards - 1, compute_dtype(output)

        def capture(grad_output: Tensor) -> None:
            if batch == 0:
                for p in params.values():
                    self._store(p, grad_output.new_zeros(0, p.numel()), forward, dtype)
                return
            g = _at_least_fp32(grad_output.detach())
            activations = [_at_least_fp32(a) for a in inputs]
            with torch.autocast(g.device.type, enabled=False):
                if sampler is not None:
                    samples = sampler(module, activations, g)
                else:
                    self._replaying = True
                    try:
                        by_name = functional_grad_sample(
                            module, params, tuple(activations), kwargs, g
                        )
                    finally:
                        self._replaying = False
                    samples = {params[n]: s for n, s in by_name.items()}
            for p in params.values():
                self._store(p, samples[p].reshape(batch, -1), forward, dtype)

        output.register_hook(capture)

    def _probe(
        self,
        module: nn.Module,
        params: dict[str, Tensor],
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Tensor,
    ) -> None:
        """Refuse a module without a grad sampler unless torch.func runs it example by example."""
        if any(isinstance(v, Tensor) for v in kwargs.values()):
            raise ValueError(
                f"{self._label(module)} has no Opacus grad sampler and gets tensor keyword "
                "arguments: pass its tensors positionally, or register a grad sampler with "
                "opacus.grad_sample.register_grad_sampler"
            )
        self._replaying = True
        try:
            match = functional_outputs_match(module, params, inputs, kwargs, output)
        except Exception as error:  # any failure of torch.func means: no torch.func path
            raise ValueError(
                f"{self._label(module)}: {type(module).__name__} has no Opacus grad sampler and "
                f"torch.func cannot compute its per-example gradients ({type(error).__name__}: "
                f"{error}); register one with opacus.grad_sample.register_grad_sampler, or "
                "freeze its parameters"
            ) from error
        finally:
            self._replaying = False
        if not match:
            raise ValueError(
                f"{self._label(module)}: {type(module).__name__} has no Opacus grad sampler and "
                "its output on each example alone differs from its batched output (it mixes "
                "examples or is random), so torch.func cannot give per-example gradients; "
                "register a grad sampler with opacus.grad_sample.register_grad_sampler, or "
                "freeze its parameters"
            )

    def _store(self, param: Tensor, sample: Tensor, forward: int, dtype: torch.dtype) -> None:
        if self.receiver is not None:
            self.receiver(param, sample.float(), forward, dtype)
            return
        previous = self._samples.get(param)
        self._samples[param] = sample if previous is None else previous + sample

    def pop(self, param: Tensor) -> Tensor:
        """Per-example gradients ``[B, numel]`` of ``param`` from the last backward pass."""
        try:
            return self._samples.pop(param)
        except KeyError:
            raise RuntimeError(
                "no per-example gradient was captured for a parameter of shape "
                f"{tuple(param.shape)}: was the model's forward run through the registered "
                "model before backward?"
            ) from None

    def held_bytes(self) -> int:
        """Bytes of the per-example gradients captured and not yet popped."""
        return sum(rows.numel() * rows.element_size() for rows in self._samples.values())

    def clear(self) -> None:
        """Drop every captured sample (e.g. after a refused step)."""
        self._samples.clear()

    def remove(self) -> None:
        """Detach the hooks and drop the captured samples."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._samples.clear()
