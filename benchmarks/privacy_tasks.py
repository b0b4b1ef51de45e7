r"""The learning tasks of the privacy benchmark: their data, their models and their test metrics.

Both models train nothing but ``nn.Linear`` layers, so that every method of the benchmark (the
separate-noise baselines clip ``[B, d]`` rows of per-example gradients directly) trains the same
model; per-example capture itself covers every common layer (:mod:`sketchcomm.privacy.capture`).

``"digits"``
    scikit-learn's handwritten digits (:func:`sketchcomm.demo.digits.load_digits`): ``N = 1,437``
    standardised 8x8 images ``[N, 64]`` for training, 360 for testing, 10 classes; the MLP
    ``64 -> hidden -> hidden -> 10`` of :func:`sketchcomm.demo.digits.make_mlp`.
``"text"``
    next-character prediction on the standard library's ``pydoc_data`` text
    (:func:`benchmarks.char_lm.load_char_text`, 103 characters, first 90% for training). A training
    example is one pair (the :data:`TEXT_CONTEXT` characters before position ``t``, the character
    at ``t``), ``x = ids[t - K : t]`` ``[K]`` int64 and ``y = ids[t]``, for :data:`TEXT_EXAMPLES`
    positions ``t`` of the training text drawn once without replacement with a fixed seed. The
    test set is every position of the held-out last 10% of the text (46,505 pairs). The model
    (:func:`make_char_mlp`) one-hot encodes the ``K`` characters and flattens them,
    ``[B, K] -> [B, K V]``, a fixed map without parameters, then runs the MLP
    ``K V -> hidden -> hidden -> V``; its first layer acts as a trainable character embedding per
    context position.

Both report the test accuracy of the argmax prediction and the mean test cross-entropy in nats
(per character for ``"text"``; its perplexity is ``exp`` of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from benchmarks.char_lm import load_char_text
from sketchcomm.demo.digits import load_digits, make_mlp

__all__ = [
    "TASKS",
    "TEXT_CONTEXT",
    "TEXT_EXAMPLES",
    "OneHot",
    "TaskData",
    "evaluate",
    "load_task",
    "make_char_mlp",
    "make_model",
    "next_char_pairs",
]

#: The tasks and a short description of each (used in plot titles).
TASKS: dict[str, str] = {
    "digits": "digits MLP",
    "text": "next-character MLP on pydoc text",
}

#: Characters of context ``K`` of one text example.
TEXT_CONTEXT = 8
#: Training examples ``N`` of the text task, drawn once from the training text.
TEXT_EXAMPLES = 65_536
_TEXT_SEED = 0


@dataclass(frozen=True)
class TaskData:
    """A task's examples: inputs ``x`` (``[n, 64]`` float for digits, ``[n, K]`` character ids for
    text), int64 labels ``y`` ``[n]``, and the number of classes."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int

    @property
    def train_size(self) -> int:
        """``N``, the number of training examples (the unit of privacy is one of them)."""
        return len(self.y_train)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")


def next_char_pairs(ids: Tensor, context: int, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids[t - context : t], ids[t])`` for every ``t`` of ``positions``: contexts
    ``[n, context]`` and next characters ``[n]``. Every position must be at least ``context``."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    if len(positions) and int(positions.min()) < context:
        raise ValueError(f"positions must be at least context ({context})")
    windows = ids.unfold(0, context, 1)  # windows[s] = ids[s : s + context]
    return windows[positions - context], ids[positions]


@cache
def load_task(task: str) -> TaskData:
    """The data of ``task`` (computed once per process; do not modify the tensors)."""
    _check_task(task)
    if task == "digits":
        d = load_digits()
        return TaskData(d.x_train, d.y_train, d.x_test, d.y_test, classes=10)
    text = load_char_text()
    generator = torch.Generator().manual_seed(_TEXT_SEED)
    candidates = len(text.train) - TEXT_CONTEXT
    train_positions = TEXT_CONTEXT + torch.randperm(candidates, generator=generator)
    x_train, y_train = next_char_pairs(text.train, TEXT_CONTEXT, train_positions[:TEXT_EXAMPLES])
    test_positions = torch.arange(TEXT_CONTEXT, len(text.test))
    x_test, y_test = next_char_pairs(text.test, TEXT_CONTEXT, test_positions)
    return TaskData(x_train, y_train, x_test, y_test, classes=text.vocab_size)


class OneHot(nn.Module):
    """``[B, K]`` ids to ``[B, K * classes]`` fp32: the one-hot code of each id, concatenated."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, ids: Tensor) -> Tensor:
        classes = torch.arange(self.classes, device=ids.device)
        return (ids.unsqueeze(-1) == classes).flatten(-2).float()


def make_char_mlp(vocab: int, context: int, hidden: int, seed: int) -> nn.Sequential:
    """One-hot of ``context`` characters, then MLP ``context * vocab -> hidden -> hidden ->
    vocab`` with seeded initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OneHot(vocab),
        nn.Linear(context * vocab, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, vocab),
    )


def make_model(task: str, hidden: int, seed: int) -> nn.Module:
    """The seeded model of ``task`` at hidden width ``hidden``."""
    _check_task(task)
    if task == "digits":
        return make_mlp(hidden, seed)
    return make_char_mlp(load_task(task).classes, TEXT_CONTEXT, hidden, seed)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 8192) -> tuple[float, float]:
    """Test accuracy of the argmax and mean cross-entropy (nats) of ``model`` on ``(x, y)``,
    computed ``chunk`` examples at a time."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(y), chunk):
            logits = model(x[start : start + chunk])
            labels = y[start : start + chunk]
            correct += int((logits.argmax(1) == labels).sum())
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return correct / len(y), loss / len(y)
