r"""Per-example gradients that are ready when DDP fires a gradient bucket.

DDP calls its communication hook for a bucket as soon as the gradients of the bucket's parameters
have been accumulated. Per-example gradients computed by module-level backward hooks (as Opacus's
``GradSampleModule`` does) may not exist yet at that moment. A hook on the module's *output
tensor* runs when the gradient with respect to that output is known, which is before the module's
backward computes, and accumulates, its parameters' gradients. So this module records each
supported layer's input in a forward hook, attaches a tensor hook to its output, and computes the
layer's per-example gradients inside that tensor hook.

For ``nn.Linear`` with input ``a`` of shape ``[B, ..., in]`` and output gradient ``g`` of shape
``[B, ..., out]`` (for a loss that *sums* over examples), example ``b``'s gradients are

.. math::

    \nabla_W \ell_b = \sum_t g_{b,t} a_{b,t}^\top \in \mathbb{R}^{out \times in}, \qquad
    \nabla_{bias} \ell_b = \sum_t g_{b,t},

where ``t`` runs over the middle dimensions (tokens). Supported layers: :data:`SUPPORTED_LAYERS`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear,)


class PerExampleGradients:
    """Captures per-example gradients of every trainable parameter of ``model``.

    Raises ``ValueError`` naming the layer types when a trainable parameter belongs to a module
    that is not in :data:`SUPPORTED_LAYERS`. After a backward pass, :meth:`pop` returns a
    parameter's per-example gradients as ``[B, numel]`` (``B`` may be 0 for an empty batch).
    """

    def __init__(self, model: nn.Module) -> None:
        unsupported = sorted(
            {
                type(module).__name__
                for module in model.modules()
                if any(p.requires_grad for p in module.parameters(recurse=False))
                and not isinstance(module, SUPPORTED_LAYERS)
            }
        )
        if unsupported:
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise ValueError(
                f"per-example clipping supports only {names} layers with trainable parameters; "
                f"the model has trainable parameters in {', '.join(unsupported)}. Freeze them "
                "(requires_grad=False) or use unit='rank'."
            )
        self._samples: dict[Tensor, Tensor] = {}
        # A new forward pass starts a new set of samples, even if the last backward failed.
        self._handles = [model.register_forward_pre_hook(lambda *_: self._samples.clear())]
        self._handles += [
            module.register_forward_hook(self._forward_hook)
            for module in model.modules()
            if isinstance(module, SUPPORTED_LAYERS)
            and any(p.requires_grad for p in module.parameters(recurse=False))
        ]

    def _forward_hook(self, module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not output.requires_grad:
            return  # evaluation or frozen: nothing to differentiate
        activation = inputs[0].detach()

        def capture(grad_output: Tensor) -> None:
            g = grad_output.detach()
            # flatten, not reshape(batch, -1): an empty Poisson batch (batch = 0) is valid input.
            if module.weight.requires_grad:
                weight = torch.einsum("b...o,b...i->boi", g, activation)
                self._store(module.weight, weight.flatten(1))
            if module.bias is not None and module.bias.requires_grad:
                self._store(module.bias, g if g.dim() == 2 else g.flatten(1, -2).sum(1))

        output.register_hook(capture)

    def _store(self, param: Tensor, sample: Tensor) -> None:
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

    def clear(self) -> None:
        self._samples.clear()

    def remove(self) -> None:
        """Detach the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._samples.clear()
