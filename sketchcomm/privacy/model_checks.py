r"""Models whose per-example rows would not be examples, or whose buffers leave unnoised.

Per-example clipping bounds one example's influence only if (a) every captured row is one example
and (b) nothing in the forward mixes examples; and a release is private only if nothing else that
depends on the data leaves the process. This module refuses, before anything is released:

* **batch statistics**: ``BatchNorm*``/``SyncBatchNorm`` (in train mode each example is normalised
  with its peers' mean and variance, so changing one example changes every row, whether or not
  the norm's parameters train), ``InstanceNorm*`` with ``track_running_stats``, and
  ``Embedding(scale_grad_by_freq=True)`` (its gradient is scaled by counts over the batch);
* **time-major modules**: any module with ``batch_first=False`` (``nn.RNN``/``LSTM``/``GRU``,
  ``nn.MultiheadAttention``, ``nn.Transformer*`` layers, Opacus's ``DPLSTM``/``DPGRU``/
  ``DPMultiheadAttention``): their rows are time steps;
* what Opacus's own validator (`opacus.validators.ModuleValidator`) reports on trainable
  modules (e.g. ``nn.LSTM`` must become ``DPLSTM``), with its message;
* **buffers that change in train mode** (running statistics) when DDP would broadcast them
  (``broadcast_buffers=True``: rank 0's buffers are sent to every rank outside the mechanism), or
  at all under ``unit="example"`` (they are part of every model an observer sees).

Buffers of modules this module does not know are checked at run time by
[`BufferWatch`][sketchcomm.privacy.model_checks.BufferWatch]. Buffers that never change (rotary
``inv_freq``, causal masks, integer or boolean buffers) pass.
"""

from __future__ import annotations

import torch
from opacus.layers.dp_multihead_attention import SequenceBias
from opacus.validators import ModuleValidator
from torch import Tensor, nn

__all__ = ["BufferWatch", "example_mixing_problems", "validate_private_model"]

BATCH_STATISTICS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
INSTANCE_NORMS: tuple[type[nn.Module], ...] = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)
BATCH_NORM_FIX = (
    "replace it with GroupNorm (opacus.validators.ModuleValidator.fix(model) does this) "
    "or LayerNorm"
)
NORM_FIX = "use GroupNorm/LayerNorm instead of BatchNorm (opacus.validators.ModuleValidator.fix)"


def _label(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


def _tracks_running_stats(module: nn.Module) -> bool:
    return isinstance(module, BATCH_STATISTICS + INSTANCE_NORMS) and bool(
        getattr(module, "track_running_stats", False)
    )


def _module_problem(module: nn.Module) -> str | None:
    if isinstance(module, BATCH_STATISTICS):
        return (
            "uses batch statistics in train mode (each example is normalised with its peers'), "
            f"even with frozen or no parameters: {BATCH_NORM_FIX}"
        )
    if isinstance(module, INSTANCE_NORMS) and module.track_running_stats:
        return (
            "tracks running statistics over the batch: use track_running_stats=False, or GroupNorm"
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "scales its gradient by token counts over the batch: use scale_grad_by_freq=False"
    if getattr(module, "batch_first", True) is False and not isinstance(module, SequenceBias):
        return (
            "is time-major (batch_first=False), so its rows are time steps, not examples: "
            "build it with batch_first=True and keep the batch in dim 0"
        )
    return None


def example_mixing_problems(model: nn.Module) -> list[str]:
    """One line per module whose per-example rows would not be single examples.

    Batch statistics and time-major modules are listed whether or not their parameters train;
    Opacus's validator is asked about every other module with trainable parameters.
    """
    problems = []
    for name, module in model.named_modules():
        found = [_module_problem(module)]
        validator = ModuleValidator.VALIDATORS.get(type(module))
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if found[0] is None and validator is not None and trainable:
            found += [f"Opacus: {error}" for error in validator(module)]
        if any(found):
            problems.append(f"{_label(name, module)} " + "; ".join(p for p in found if p))
    return problems


def _changing_buffers(model: nn.Module) -> list[str]:
    """Floating-point buffers that known modules update in train mode (running statistics)."""
    return [
        f"{name + '.' if name else ''}{buffer_name} of {_label(name, module)}"
        for name, module in model.named_modules()
        if _tracks_running_stats(module)
        for buffer_name, buffer in module.named_buffers(recurse=False)
        if buffer is not None and buffer.is_floating_point()
    ]


def _buffer_refusal(unit: str, buffers: list[str]) -> str:
    if unit == "example":
        reason = "under unit='example' they are part of every model an observer sees, unnoised"
        fix = f"{NORM_FIX}, or keep data-dependent state out of the model's buffers"
    else:
        reason = "DDP would broadcast rank 0's copy to every rank each step, outside the noise"
        fix = (
            f"wrap the model in DistributedDataParallel(..., broadcast_buffers=False) or {NORM_FIX}"
        )
    return (
        f"floating-point buffers that change in train mode ({', '.join(buffers)}): {reason}; {fix}"
    )


def validate_private_model(model: nn.Module, unit: str, broadcast_buffers: bool) -> None:
    """Raise ``ValueError`` listing every module that would void the privacy guarantee.

    Args:
        model: the model (unwrapped from DDP: ``ddp_model.module``).
        unit: ``"example"`` (rows must be examples, no changing buffers at all) or ``"rank"``
            (changing buffers only refused when broadcast).
        broadcast_buffers: DDP's setting (``ddp_model.broadcast_buffers``).

    >>> validate_private_model(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)), "example", True)
    >>> validate_private_model(nn.BatchNorm1d(2, affine=False), "rank", False)
    """
    if unit not in ("example", "rank"):
        raise ValueError(f"unit must be 'example' or 'rank', got {unit!r}")
    problems = example_mixing_problems(model) if unit == "example" else []
    buffers = _changing_buffers(model)
    if buffers and (broadcast_buffers or unit == "example"):
        problems.append(_buffer_refusal(unit, buffers))
    if problems:
        listing = "\n- ".join(problems)
        raise ValueError(f"this model cannot be trained privately with unit={unit!r}:\n- {listing}")


class BufferWatch:
    """Snapshot of a model's floating-point buffers, to find those that change in training.

    Take it when the model is registered; call `changed()` (or `refuse_changed()`) after
    the first training forward and before anything is released. A buffer counts as changed when
    its values differ from the snapshot, or when a floating-point buffer appeared or was removed.

    >>> model = nn.BatchNorm1d(2, affine=False)
    >>> watch = BufferWatch(model)
    >>> _ = model(torch.randn(4, 2))
    >>> watch.changed()
    ['running_mean', 'running_var']
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.snapshot = self._floating_buffers()

    def _floating_buffers(self) -> dict[str, Tensor]:
        return {
            name: buffer.detach().clone()
            for name, buffer in self.model.named_buffers()
            if buffer.is_floating_point()
        }

    def changed(self) -> list[str]:
        """Qualified names of the floating-point buffers that changed since the snapshot."""
        now = dict(self.model.named_buffers())
        names = sorted(set(self.snapshot) | {n for n, b in now.items() if b.is_floating_point()})
        return [
            name
            for name in names
            if name not in now
            or name not in self.snapshot
            or not torch.equal(now[name].detach(), self.snapshot[name])
        ]

    def refuse_changed(self, unit: str, broadcast_buffers: bool) -> None:
        """Raise ``ValueError`` if changed buffers would leave unnoised (see the module doc)."""
        changed = self.changed()
        if changed and (broadcast_buffers or unit == "example"):
            raise ValueError(
                f"this model cannot be trained privately with unit={unit!r}: "
                + _buffer_refusal(unit, changed)
            )
