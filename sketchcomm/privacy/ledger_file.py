"""The privacy ledger file: its JSON layout (schema version 1), its validation, and atomic
persistence.

A ledger file is one JSON object: ``format`` (:data:`LEDGER_FORMAT`), ``schema_version``
(:data:`LEDGER_SCHEMA_VERSION`), the ledger's ``accountant``, ``delta``, ``budget``, ``unit``,
``secure_mode`` and ``dataset_size``, the total ``steps`` and ``epsilon`` (``"inf"`` when
unbounded), the ``history`` as a list of ``{noise_multiplier, sample_rate, steps}`` and the
``opacus_version``, ``created_at`` and ``updated_at`` it was written with. A file is replaced
atomically (temp file in the same directory, fsync, rename, fsync of the directory), so a reader
or a crash sees the previous content or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sketchcomm.privacy.accounting import ACCOUNTANTS

__all__ = [
    "LEDGER_FORMAT",
    "LEDGER_SCHEMA_VERSION",
    "LedgerError",
    "json_epsilon",
    "read_ledger_file",
    "utc_now",
    "validate_ledger_state",
    "write_ledger_file",
]

#: Value of the ``format`` field of a ledger file.
LEDGER_FORMAT = "sketchcomm-privacy-ledger"

#: Version of the ledger file layout; files with another version are refused.
LEDGER_SCHEMA_VERSION = 1


class LedgerError(ValueError):
    """A ledger file or state dict cannot be used: corrupt, unreadable, of an unknown schema, or
    written for a different accountant, delta, unit of privacy or noise source.

    The file in question is never modified when this is raised.
    """


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second (the ``created_at`` and ``updated_at``
    fields)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def json_epsilon(epsilon: float) -> float | str:
    """``epsilon`` as the ``epsilon`` field holds it: JSON has no infinity, so an unbounded
    epsilon is written as the string ``"inf"``."""
    return epsilon if math.isfinite(epsilon) else "inf"


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
    """The validated content of the ledger file at ``path``.

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
    validate_ledger_state(state, source=f"ledger file {path}")
    return state


def write_ledger_file(path: Path, state: Mapping[str, Any]) -> None:
    """Replace the ledger file at ``path`` with ``state`` (as JSON), atomically."""
    _write_atomically(path, json.dumps(state, indent=2) + "\n")


def validate_ledger_state(state: Any, *, source: str) -> None:
    """Raise LedgerError unless ``state`` has the layout of ledger schema version 1."""

    def fail(problem: str) -> LedgerError:
        return LedgerError(f"{source} is not a valid privacy ledger: {problem}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(state, Mapping):
        raise fail(f"expected a JSON object, got {type(state).__name__}")
    if state.get("format") != LEDGER_FORMAT:
        raise fail(f"format is {state.get('format')!r}, expected {LEDGER_FORMAT!r}")
    if state.get("schema_version") != LEDGER_SCHEMA_VERSION:
        raise fail(
            f"schema_version is {state.get('schema_version')!r}; this version of sketchcomm "
            f"reads version {LEDGER_SCHEMA_VERSION}"
        )
    required = (
        "accountant",
        "delta",
        "budget",
        "unit",
        "secure_mode",
        "dataset_size",
        "steps",
        "epsilon",
        "history",
        "created_at",
        "updated_at",
    )
    missing = [key for key in required if key not in state]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    if state["accountant"] not in ACCOUNTANTS:
        raise fail(f"unknown accountant {state['accountant']!r}")
    if not (number(state["delta"]) and 0.0 < state["delta"] < 1.0):
        raise fail(f"delta must be a number in (0, 1), got {state['delta']!r}")
    budget = state["budget"]
    if budget is not None and not (number(budget) and 0.0 < budget < math.inf):
        raise fail(f"budget must be null or a positive number, got {budget!r}")
    if not isinstance(state["unit"], str) or not state["unit"].strip():
        raise fail(f"unit must be a non-empty string, got {state['unit']!r}")
    if not isinstance(state["secure_mode"], bool):
        raise fail(f"secure_mode must be true or false, got {state['secure_mode']!r}")
    size = state["dataset_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise fail(f"dataset_size must be null or a positive integer, got {size!r}")
    if size is not None and state["delta"] >= 1.0 / size:
        raise fail(f"delta {state['delta']!r} is not below 1/dataset_size for {size} units")
    epsilon = state["epsilon"]
    if not (number(epsilon) or epsilon == "inf"):
        raise fail(f"epsilon must be a number or 'inf', got {epsilon!r}")
    for key in ("created_at", "updated_at"):
        if not isinstance(state[key], str):
            raise fail(f"{key} must be a string, got {state[key]!r}")
    history = state["history"]
    if not isinstance(history, list):
        raise fail("history must be a list")
    total = 0
    for index, entry in enumerate(history):
        if not isinstance(entry, Mapping) or set(entry) != {
            "noise_multiplier",
            "sample_rate",
            "steps",
        }:
            raise fail(
                f"history[{index}] must hold exactly noise_multiplier, sample_rate and steps"
            )
        sigma, q, count = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
        if not (number(sigma) and 0.0 <= sigma < math.inf):
            raise fail(f"history[{index}].noise_multiplier must be >= 0, got {sigma!r}")
        if not (number(q) and 0.0 < q <= 1.0):
            raise fail(f"history[{index}].sample_rate must be in (0, 1], got {q!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise fail(f"history[{index}].steps must be a positive integer, got {count!r}")
        total += count
    if state["accountant"] == "gdp" and len(history) > 1:
        raise fail("a gdp ledger holds at most one history entry")
    if state["steps"] != total:
        raise fail(f"steps is {state['steps']!r} but the history holds {total} steps")
