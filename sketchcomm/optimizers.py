r"""What the sketch hook does about the user's optimizer, decided once and told once.

FetchSGD's recovery (``error_feedback="sketch"``) returns a sparse, delayed update: the ``k``
largest coordinates of the error accumulated in the summed table. Momentum belongs *before* that
selection, on the table (``S_u <- rho S_u + S``); an optimizer's momentum applied to the recovered
update instead averages updates that each hold a different handful of coordinates, and trains
worse (character Llama, 10x: eval loss 1.18x allreduce's after 60 steps). So when the hook sees
the optimizer it:

* ``torch.optim.SGD`` with momentum ``rho > 0`` (and no Nesterov): moves it into sketch space,
  the hook keeps ``rho`` on the summed table and the optimizer's ``momentum`` is set to 0 in
  every parameter group ("moved");
* any other optimizer (AdamW, Adam, plain SGD, ...): leaves it alone ("kept"); the hook's
  recovered update is its gradient;
* a recovery without sketch-space state (``second_round=True``, ``"dense"``) is
  optimizer-agnostic: nothing is moved.

For SGD with momentum and for adaptive optimizers (anything but SGD) the choice also sets ``k``
to every coordinate of the bucket (:data:`MOMENTUM_TOPK_FRACTION`,
:data:`ADAPTIVE_TOPK_FRACTION`; ``choice.topk_fraction``, which :func:`configured` applies).
Recovering every coordinate extracts every cell, so FetchSGD's zeroing empties the error and
momentum tables each step: the update is the median estimate of the step's summed table, with no
delayed error and no momentum left. Measured on a byte-level GPT-2 and a digits CNN, 3 seeds, at
10x to 100x (docs/accuracy-frontier.md), that trained closer to allreduce than the few largest
coordinates with error accumulation and momentum (``k = 0.01 d`` and ``0.1 d``) at every ratio,
with both optimizers; ``k = 0.5 d`` did about as well, at far more selection work. Keeping the
optimizer's momentum on the every-coordinate estimate instead (``recovery="dense"``) was better
still on the GPT-2 and diverged on the CNN at 50x, so it is not the default.

A ``topk_fraction`` the user sets is kept as it is (``choose(..., topk_given=True)``, which
[`SketchState`][sketchcomm.SketchState] passes when ``topk_fraction`` is among its options or a
whole ``config`` is given); only the default is raised.

The hook learns the optimizer from [`SketchState.attach()`][sketchcomm.SketchState.attach], or by
itself at the optimizer's first ``step()`` (a step pre-hook that matches the optimizer's
parameters with the model's); the decision is logged and warned once, and
[`SketchState.describe()`][sketchcomm.SketchState.describe] says it.

>>> import torch
>>> from sketchcomm.config import SketchConfig
>>> weights = [torch.nn.Parameter(torch.zeros(3))]
>>> optimizer = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
>>> choice = choose(SketchConfig(compression=10), optimizer)
>>> choice.action, choice.momentum
('moved', 0.9)
>>> apply_choice(choice, optimizer); optimizer.param_groups[0]["momentum"]
0.0
>>> configured(choice, SketchConfig(compression=10)).topk_fraction
1.0
>>> adaptive = choose(SketchConfig(compression=10), torch.optim.AdamW(weights))
>>> configured(adaptive, SketchConfig(compression=10)).topk_fraction
1.0
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sketchcomm.config import SketchConfig

__all__ = [
    "ADAPTIVE_TOPK_FRACTION",
    "MOMENTUM_TOPK_FRACTION",
    "OptimizerChoice",
    "OptimizerWatch",
    "apply_choice",
    "choose",
    "configured",
]

ACTIONS = ("moved", "kept", "agnostic")
#: The fraction of each bucket recovered per step for an adaptive optimizer when the user did not
#: set ``topk_fraction`` (every coordinate); measured in docs/accuracy-frontier.md.
ADAPTIVE_TOPK_FRACTION = 1.0
#: The fraction of each bucket recovered per step when SGD's momentum is moved into sketch space
#: and the user did not set ``topk_fraction`` (every coordinate); docs/accuracy-frontier.md.
MOMENTUM_TOPK_FRACTION = 1.0
#: What the measurements of docs/accuracy-frontier.md say about adaptive optimizers here.
ADAPTIVE_NOTE = (
    "; adaptive optimizers train slower than with allreduce on this sketched update (AdamW, "
    "GPT-2 bytes, 200 steps, 50x: eval loss 1.19x allreduce's with k = d, PowerSGD rank 1 "
    "1.14x; docs/accuracy-frontier.md): compare with an allreduce run"
)


@dataclass(frozen=True)
class OptimizerChoice:
    """What the hook decided about an optimizer.

    ``optimizer`` is its class name, ``action`` one of ``"moved"`` (its momentum now lives in the
    sketch and the optimizer's is 0), ``"kept"`` (the optimizer is left as it is) or
    ``"agnostic"`` (the recovery keeps no sketch-space state), ``momentum`` the sketch-space
    momentum the hook uses, ``message`` the sentence that tells the user, ``topk_fraction`` the
    least fraction of each bucket the recovery keeps per step (0: as configured).

    >>> OptimizerChoice("AdamW", "kept", 0.0, "...").as_record()["action"]
    'kept'
    """

    optimizer: str
    action: str
    momentum: float
    message: str
    topk_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")
        if not 0.0 <= self.topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in [0, 1], got {self.topk_fraction}")

    def as_record(self) -> dict[str, Any]:
        """A plain dict (what a checkpoint stores)."""
        return asdict(self)


def _sgd_momentum(optimizer: torch.optim.Optimizer) -> float:
    """The momentum of an SGD optimizer's groups, which must all agree; 0 for other optimizers."""
    if not isinstance(optimizer, torch.optim.SGD):
        return 0.0
    groups = optimizer.param_groups
    momenta = {float(group.get("momentum", 0.0)) for group in groups}
    if len(momenta) > 1:
        raise ValueError(
            f"the optimizer's parameter groups use different momenta {sorted(momenta)}: give "
            "them one momentum, or set momentum=RHO in SketchState and 0 in the optimizer"
        )
    momentum = momenta.pop()
    if momentum and any(group.get("nesterov", False) for group in groups):
        raise ValueError(
            "Nesterov momentum cannot be moved into sketch space: use nesterov=False, or "
            "second_round=True (optimizer-agnostic recovery)"
        )
    return momentum


def choose(
    config: SketchConfig, optimizer: torch.optim.Optimizer, *, topk_given: bool = False
) -> OptimizerChoice:
    """The decision for ``optimizer`` under ``config`` (see the module docstring). With
    ``topk_given`` (the user set ``topk_fraction``) the choice keeps the configured ``k``."""
    name = type(optimizer).__name__
    if config.error_feedback != "sketch":
        return OptimizerChoice(
            name,
            "agnostic",
            0.0,
            f"{name} left as it is: recovery {_recovery(config)} keeps no state in sketch space",
        )
    momentum = _sgd_momentum(optimizer)
    if momentum:
        rho = config.momentum or momentum
        least = 0.0 if topk_given else MOMENTUM_TOPK_FRACTION
        return OptimizerChoice(
            name,
            "moved",
            rho,
            f"{name} momentum {momentum:g} moved into sketch space: the hook keeps momentum "
            f"{rho:g} on the summed table and the optimizer's momentum is set to 0; "
            f"{_kept(config, least)}",
            least,
        )
    if isinstance(optimizer, torch.optim.SGD):
        return OptimizerChoice(
            name,
            "kept",
            config.momentum,
            f"{name} left as it is: it gets the recovered top-k update as its gradient "
            f"(sketch-space momentum {config.momentum:g})",
        )
    least = 0.0 if topk_given else ADAPTIVE_TOPK_FRACTION
    return OptimizerChoice(
        name,
        "kept",
        config.momentum,
        f"{name} left as it is: it gets the recovered top-k update as its gradient "
        f"(sketch-space momentum {config.momentum:g}), with {_kept(config, least)} (an adaptive "
        f"optimizer needs more coordinates per step){ADAPTIVE_NOTE}",
        least,
    )


def _kept(config: SketchConfig, least: float) -> str:
    """How many coordinates per bucket the recovery keeps, and why."""
    fraction = max(config.topk_fraction, least)
    why = "chosen for this optimizer" if fraction > config.topk_fraction else "as configured"
    if fraction < 1.0:
        return f"k = {fraction:g} d recovered per bucket of d elements ({why})"
    return (
        f"every coordinate recovered per step, k = d ({why}): the update is the median estimate "
        "of the step's summed table, and the error and momentum tables are emptied every step"
    )


def configured(choice: OptimizerChoice, requested: SketchConfig) -> SketchConfig:
    """The configuration the hook runs with after ``choice``: ``requested`` with the choice's
    sketch-space momentum and ``topk_fraction`` raised to the choice's least fraction."""
    return replace(
        requested,
        momentum=choice.momentum,
        topk_fraction=max(requested.topk_fraction, choice.topk_fraction),
    )


def apply_choice(choice: OptimizerChoice, optimizer: torch.optim.Optimizer) -> None:
    """Set the optimizer's momentum to 0 when ``choice`` moved it (its momentum buffers are
    dropped, so that no stale momentum keeps acting)."""
    if choice.action != "moved":
        return
    for group in optimizer.param_groups:
        group["momentum"] = 0.0
    for parameter_state in optimizer.state.values():
        parameter_state.pop("momentum_buffer", None)


def _recovery(config: SketchConfig) -> str:
    if config.second_round:
        return "'topk' with a second round and local error feedback"
    return repr(config.recovery)


class OptimizerWatch:
    """Calls ``on_optimizer(optimizer)`` at the first ``step()`` of an optimizer whose parameters
    all belong to ``parameters`` (a torch global step pre-hook, removed once it has fired).

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> seen = []
    >>> watch = OptimizerWatch(model.parameters(), seen.append)
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> optimizer.step(); [type(o).__name__ for o in seen], watch.active
    (['AdamW'], False)
    """

    def __init__(self, parameters: Any, on_optimizer: Any) -> None:
        # Weak references, compared by identity: an id alone could be reused by a later tensor.
        self.owned = {id(p): weakref.ref(p) for p in parameters}
        self.on_optimizer = on_optimizer
        self.handle = register_optimizer_step_pre_hook(self.pre_step)

    @property
    def active(self) -> bool:
        return self.handle is not None

    def pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        owned = [
            (ref := self.owned.get(id(p))) is not None and ref() is p
            for group in optimizer.param_groups
            for p in group["params"]
        ]
        if owned and all(owned):
            self.remove()
            self.on_optimizer(optimizer)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
