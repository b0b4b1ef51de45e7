"""One registry of DDP communication hooks by name: what every ``--hook`` option chooses from.

A *hook kind* is a name and a factory ``build(**options) -> (state, hook)``: ``hook(state,
bucket)`` is what DDP calls for each gradient bucket, and ``hook is None`` keeps DDP's own
allreduce. [`attach_hook()`][sketchcomm.hook_kinds.attach_hook] builds a kind and registers it on a
DDP model. The built-in kinds:

* ``allreduce`` — DDP's default: the fp32 gradients;
* ``fp16`` — torch's ``default_hooks.fp16_compress_hook`` (half the bytes);
* ``powersgd`` — torch's ``powerSGD_hook`` (options ``rank``, ``seed``);
* ``sketch`` — [`SketchState`][sketchcomm.SketchState] + [`sketch_hook()`][sketchcomm.sketch_hook]
  (options: those of ``SketchState``; registered by `attach_hook()`, it sees the optimizer at its
  first step and moves SGD's momentum into sketch space);
* ``private`` — [`DPSketchState`][sketchcomm.privacy.DPSketchState] +
  [`dp_sketch_hook()`][sketchcomm.privacy.dp_sketch_hook] (options: those of ``DPSketchState``,
  including its ``ledger`` and ``max_grad_norm``).

Benchmarks add their baselines with
[`register_hook_kind()`][sketchcomm.hook_kinds.register_hook_kind].

>>> from sketchcomm.hook_kinds import build_hook, hook_kinds
>>> hook_kinds()[:5]  # the built-in kinds come first
('allreduce', 'fp16', 'powersgd', 'sketch', 'private')
>>> state, hook = build_hook("sketch", compression=10)
>>> (type(state).__name__, hook.__name__, state.config.compression)
('SketchState', 'sketch_hook', 10.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

#: ``build(**options) -> (state, hook)``; ``hook`` is ``None`` for DDP's own allreduce.
HookFactory = Callable[..., tuple[Any, Callable | None]]


@dataclass(frozen=True)
class HookKind:
    """A named way for DDP to communicate gradient buckets.

    Args:
        name: what ``--hook`` options call it.
        build: ``build(**options) -> (state, hook)``; ``hook`` ``None`` keeps DDP's allreduce.
        description: one line for help texts.

    >>> from sketchcomm.hook_kinds import HookKind
    >>> kind = HookKind("allreduce-again", lambda: (None, None), "DDP's default once more")
    >>> kind.build()
    (None, None)
    """

    name: str
    build: HookFactory
    description: str


def _allreduce() -> tuple[None, None]:
    return None, None


def _fp16() -> tuple[None, Callable]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return None, default_hooks.fp16_compress_hook


def _powersgd(rank: int = 1, seed: int = 0) -> tuple[Any, Callable]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=rank,
        start_powerSGD_iter=2,
        min_compression_rate=2,
        random_seed=seed,
    )
    return state, powerSGD_hook.powerSGD_hook


def _sketch(**options: Any) -> tuple[Any, Callable]:
    from sketchcomm.hooks import SketchState, sketch_hook

    return SketchState(**options), sketch_hook


def _private(**options: Any) -> tuple[Any, Callable]:
    from sketchcomm.privacy import DPSketchState, dp_sketch_hook

    return DPSketchState(**options), dp_sketch_hook


_KINDS: dict[str, HookKind] = {
    kind.name: kind
    for kind in (
        HookKind("allreduce", _allreduce, "fp32 gradients (DDP's default)"),
        HookKind("fp16", _fp16, "gradients cast to fp16 (half the bytes)"),
        HookKind("powersgd", _powersgd, "PowerSGD low-rank factors"),
        HookKind("sketch", _sketch, "Count Sketch tables, --compression times smaller"),
        HookKind("private", _private, "Count Sketch tables clipped and noised (DP)"),
    )
}


def register_hook_kind(name: str, build: HookFactory, description: str) -> HookKind:
    """Add a hook kind under ``name`` (e.g. a benchmark's baseline); returns it.

    Raises:
        ValueError: if ``name`` is taken: pick another name.
    """
    if name in _KINDS:
        raise ValueError(f"a hook kind named {name!r} is already registered: pick another name")
    kind = HookKind(name, build, description)
    _KINDS[name] = kind
    return kind


def hook_kinds() -> tuple[str, ...]:
    """The names of every registered kind, built-in ones first."""
    return tuple(_KINDS)


def get_hook_kind(name: str) -> HookKind:
    """The kind called ``name``; ``ValueError`` naming the registered ones otherwise."""
    if name not in _KINDS:
        raise ValueError(f"hook must be one of {', '.join(_KINDS)}, got {name!r}")
    return _KINDS[name]


def build_hook(name: str, **options: Any) -> tuple[Any, Callable | None]:
    """``(state, hook)`` of kind ``name`` built with ``options``, not yet registered."""
    return get_hook_kind(name).build(**options)


def attach_hook(ddp_model: nn.Module, name: str, **options: Any) -> Any:
    """Build kind ``name`` with ``options``, register it on ``ddp_model``; returns its state.

    A [`SketchState`][sketchcomm.SketchState] registers itself
    ([`register()`][sketchcomm.SketchState.register] binds its per-bucket state to the parameters,
    so that it survives DDP's bucket rebuild); any other state is passed to
    ``ddp_model.register_comm_hook``. ``allreduce`` registers nothing and returns ``None``.
    """
    from sketchcomm.hooks import SketchState

    state, hook = build_hook(name, **options)
    if hook is None:
        return state
    if isinstance(state, SketchState):
        state.register(ddp_model, hook)
    else:
        ddp_model.register_comm_hook(state, hook)
    return state
