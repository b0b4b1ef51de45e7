"""The privacy ledger file: its JSON layout (schema version 2, version 1 migrated on reading),
its validation, and atomic persistence.

A ledger file is one JSON object: ``format``
([`LEDGER_FORMAT`][sketchcomm.privacy.ledger_file.LEDGER_FORMAT]), ``schema_version``
([`LEDGER_SCHEMA_VERSION`][sketchcomm.privacy.ledger_file.LEDGER_SCHEMA_VERSION]), the ledger's
``accountant``, ``delta``, ``budget``, ``unit``, ``secure_mode``, ``colluding_ranks`` (``t``, or
null when not stated) and ``dataset_size``, the total ``steps``, the guaranteed ``epsilon`` (towards
outside observers and any ``t`` colluding ranks) and the ``outsider_epsilon`` (towards outside
observers only), both ``"inf"`` when unbounded, the ``history`` and ``outsider_history`` of the
noise multipliers behind them as lists of ``{noise_multiplier, sample_rate, steps}``, and the
``opacus_version``, ``created_at`` and ``updated_at`` it was written with. A version 1 file (no
threat model) reads as ``colluding_ranks`` null with an outsider history equal to the guaranteed
one.

A file is replaced atomically (temp file in the same directory, fsync, rename, fsync of the
directory), so a reader or a crash sees the previous content or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import opacus

from sketchcomm.privacy.accounting import ACCOUNTANTS, History, check_delta

__all__ = [
    "LEDGER_FORMAT",
    "LEDGER_SCHEMA_VERSION",
    "LedgerError",
    "check_ledger_parameters",
    "epsilon_from_json",
    "epsilon_to_json",
    "history_from_json",
    "history_to_json",
    "ledger_state",
    "read_ledger_file",
    "utc_now",
    "validate_ledger_state",
    "write_ledger_file",
]

#: Value of the ``format`` field of a ledger file.
LEDGER_FORMAT = "sketchcomm-privacy-ledger"

#: Version of the ledger file layout written; version 1 is read and migrated, others refused.
LEDGER_SCHEMA_VERSION = 2

_HISTORIES = ("history", "outsider_history")


class LedgerError(ValueError):
    """A ledger file or state dict cannot be used: corrupt, unreadable, of an unknown schema, or
    written for a different accountant, delta, unit of privacy, noise source or threat model.

    The file in question is never modified when this is raised.

    >>> import pathlib, tempfile
    >>> from sketchcomm.privacy import PrivacyLedger
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.json"
    >>> _ = PrivacyLedger("rdp", delta=1e-5, path=path)
    >>> try:
    ...     PrivacyLedger("prv", delta=1e-5, path=path)
    ... except LedgerError as err:
    ...     print(str(err).split(";")[0].endswith("but this ledger has accountant='prv'"))
    True
    """


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second (the ``created_at`` and ``updated_at``
    fields)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def epsilon_to_json(epsilon: float) -> float | str:
    """``epsilon`` as JSON holds it: JSON has no infinity, so an unbounded epsilon is the string
    ``"inf"``.

    >>> epsilon_to_json(float("inf")), epsilon_from_json("inf")
    ('inf', inf)
    """
    return epsilon if math.isfinite(epsilon) else "inf"


def epsilon_from_json(value: float | str) -> float:
    """The epsilon that [`epsilon_to_json()`][sketchcomm.privacy.ledger_file.epsilon_to_json]
    wrote."""
    return math.inf if value == "inf" else float(value)


def history_to_json(history: History) -> list[dict[str, Any]]:
    """A history as the file lists it."""
    return [
        {"noise_multiplier": sigma, "sample_rate": q, "steps": count} for sigma, q, count in history
    ]


def history_from_json(entries: list[Mapping[str, Any]]) -> History:
    """The history of a validated file's list."""
    return tuple(
        (float(entry["noise_multiplier"]), float(entry["sample_rate"]), entry["steps"])
        for entry in entries
    )


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader or a crash sees the old or the new
    content, never a mix: temp file in the same directory, fsync, rename, fsync the directory."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if os.name == "posix":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_ledger_file(path: Path) -> dict[str, Any]:
    """The validated content of the ledger file at ``path``, in the current layout.

    Raises:
        LedgerError: if the file cannot be read, is not JSON, or is not a valid ledger.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"ledger file {path} cannot be read: {err}") from err
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise LedgerError(f"ledger file {path} is not valid JSON (corrupt?): {err}") from err
    return validate_ledger_state(state, source=f"ledger file {path}")


def write_ledger_file(path: Path, state: Mapping[str, Any]) -> None:
    """Replace the ledger file at ``path`` with ``state`` (as JSON), atomically."""
    _write_atomically(path, json.dumps(state, indent=2) + "\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _history_steps(history: Any, name: str, fail: Any) -> int:
    """Check one history list and return its number of steps."""
    if not isinstance(history, list):
        raise fail(f"{name} must be a list")
    total = 0
    for index, entry in enumerate(history):
        keys = {"noise_multiplier", "sample_rate", "steps"}
        if not isinstance(entry, Mapping) or set(entry) != keys:
            raise fail(f"{name}[{index}] must hold exactly noise_multiplier, sample_rate and steps")
        sigma, q, count = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
        if not (_is_number(sigma) and 0.0 <= sigma < math.inf):
            raise fail(f"{name}[{index}].noise_multiplier must be >= 0, got {sigma!r}")
        if not (_is_number(q) and 0.0 < q <= 1.0):
            raise fail(f"{name}[{index}].sample_rate must be in (0, 1], got {q!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise fail(f"{name}[{index}].steps must be a positive integer, got {count!r}")
        total += count
    return total


def validate_ledger_state(state: Any, *, source: str) -> dict[str, Any]:
    """``state`` in the layout of schema version 2 (a version 1 state is migrated: no
    ``colluding_ranks``, outsider history equal to the history); raise LedgerError if it is not
    a valid ledger."""

    def fail(problem: str) -> LedgerError:
        return LedgerError(f"{source} is not a valid privacy ledger: {problem}")

    if not isinstance(state, Mapping):
        raise fail(f"expected a JSON object, got {type(state).__name__}")
    if state.get("format") != LEDGER_FORMAT:
        raise fail(f"format is {state.get('format')!r}, expected {LEDGER_FORMAT!r}")
    version = state.get("schema_version")
    if version not in (1, LEDGER_SCHEMA_VERSION) or isinstance(version, bool):
        raise fail(
            f"schema_version is {version!r}; this version of sketchcomm reads versions 1 and "
            f"{LEDGER_SCHEMA_VERSION}"
        )
    required = ["accountant", "delta", "budget", "unit", "secure_mode", "dataset_size", "steps"]
    required += ["epsilon", "history", "created_at", "updated_at"]
    if version == LEDGER_SCHEMA_VERSION:
        required += ["colluding_ranks", "outsider_epsilon", "outsider_history"]
    missing = [key for key in required if key not in state]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    state = dict(state)
    if version == 1:
        state.update(
            schema_version=LEDGER_SCHEMA_VERSION,
            colluding_ranks=None,
            outsider_epsilon=state["epsilon"],
            outsider_history=state["history"],
        )
    if state["accountant"] not in ACCOUNTANTS:
        raise fail(f"unknown accountant {state['accountant']!r}")
    size = state["dataset_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise fail(f"dataset_size must be null or a positive integer, got {size!r}")
    if not _is_number(state["delta"]):
        raise fail(f"delta must be a number, got {state['delta']!r}")
    try:
        check_delta(state["delta"], size)
    except ValueError as err:
        raise fail(str(err)) from err
    budget = state["budget"]
    if budget is not None and not (_is_number(budget) and 0.0 < budget < math.inf):
        raise fail(f"budget must be null or a positive number, got {budget!r}")
    if not isinstance(state["unit"], str) or not state["unit"].strip():
        raise fail(f"unit must be a non-empty string, got {state['unit']!r}")
    if not isinstance(state["secure_mode"], bool):
        raise fail(f"secure_mode must be true or false, got {state['secure_mode']!r}")
    colluding = state["colluding_ranks"]
    if colluding is not None and (
        isinstance(colluding, bool) or not isinstance(colluding, int) or colluding < 0
    ):
        raise fail(f"colluding_ranks must be null or an integer >= 0, got {colluding!r}")
    for key in ("epsilon", "outsider_epsilon"):
        if not (_is_number(state[key]) or state[key] == "inf"):
            raise fail(f"{key} must be a number or 'inf', got {state[key]!r}")
    for key in ("created_at", "updated_at"):
        if not isinstance(state[key], str):
            raise fail(f"{key} must be a string, got {state[key]!r}")
    for key in _HISTORIES:
        total = _history_steps(state[key], key, fail)
        if state["accountant"] == "gdp" and len(state[key]) > 1:
            raise fail(f"a gdp ledger holds at most one {key} entry")
        if state["steps"] != total:
            raise fail(f"steps is {state['steps']!r} but the {key} holds {total} steps")
    return state


#: The fields a ledger is constructed with, which a file must match to be continued.
MATCHED_PARAMETERS = ("accountant", "delta", "unit", "secure_mode", "colluding_ranks")


def ledger_state(
    parameters: Mapping[str, Any],
    history: History,
    outsider_history: History,
    epsilons: Sequence[float],
    created_at: str,
    updated_at: str,
) -> dict[str, Any]:
    """The file's content for a ledger's ``parameters`` (accountant, delta, budget, unit,
    secure_mode, colluding_ranks, dataset_size), its two histories and their two epsilons
    (guaranteed, outsider)."""
    epsilon, outsider_epsilon = epsilons
    return {
        "format": LEDGER_FORMAT,
        "schema_version": LEDGER_SCHEMA_VERSION,
        **parameters,
        "steps": sum(count for _, _, count in history),
        "epsilon": epsilon_to_json(epsilon),
        "outsider_epsilon": epsilon_to_json(outsider_epsilon),
        "history": history_to_json(history),
        "outsider_history": history_to_json(outsider_history),
        "opacus_version": opacus.__version__,
        "created_at": created_at,
        "updated_at": updated_at,
    }


def check_ledger_parameters(
    state: Mapping[str, Any], parameters: Mapping[str, Any], *, source: str
) -> tuple[History, History]:
    """The (guaranteed, outsider) histories of a validated ``state``, after checking that it was
    written with the same [`MATCHED_PARAMETERS`][sketchcomm.privacy.ledger_file.MATCHED_PARAMETERS]
    as ``parameters``.

    Raises:
        LedgerError: naming the field that differs and the remedy.
    """
    for key in MATCHED_PARAMETERS:
        if state[key] != parameters[key]:
            raise LedgerError(
                f"{source} was written with {key}={state[key]!r} but this ledger has "
                f"{key}={parameters[key]!r}; nothing was changed: construct the ledger with "
                f"{key}={state[key]!r} to continue it (PrivacyLedger.open reads every field "
                "from the file), or use a new path for a new run"
            )
    return history_from_json(state["history"]), history_from_json(state["outsider_history"])
