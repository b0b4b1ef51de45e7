r"""A persistent, budget-enforcing record of the privacy spent by a training run.

Each released step is one Poisson subsampled Gaussian mechanism (each unit of privacy in the batch
with probability `q`, clipped to L2 norm `C`, noise `σ C` on the sum).
[`PrivacyLedger`][sketchcomm.privacy.ledger.PrivacyLedger] keeps every step's `(σ, q)` as Opacus's
accountants keep their ``history`` and obtains ε from a real Opacus accountant, in two histories:
the *guaranteed* multiplier, which remains after ``t`` colluding ranks remove their own noise shares
(it holds towards outside observers and any ``t`` colluding ranks; the budget is enforced on it),
and the multiplier an outside observer of the aggregate faces (all shares in). Sketching or
compression of the noisy result is post-processing: the ledger claims no privacy from it.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sketchcomm.privacy.accounting import (
    History,
    PrivacyBudgetExceeded,
    cached_epsilon,
    check_accountant,
    check_budget,
    check_delta,
    check_noise_multiplier,
    check_outsider_noise_multiplier,
    check_sample_rate,
    history_extends,
    stepped_history,
)
from sketchcomm.privacy.ledger_file import (
    LedgerError,
    check_ledger_parameters,
    ledger_state,
    read_ledger_file,
    utc_now,
    validate_ledger_state,
    write_ledger_file,
)
from sketchcomm.validation import check_bool, check_int, check_positive_int

__all__ = ["LedgerError", "PrivacyBudgetExceeded", "PrivacyLedger"]


class PrivacyLedger:
    r"""Records the privacy spent by a run, enforces an ε budget and persists itself.

    The ledger describes `(ε, δ)`-DP with respect to adding or removing one ``unit`` (by default one
    training example) for the Poisson subsampled Gaussian mechanism applied once per recorded step.
    δ is fixed for the life of the ledger and ε is computed from the history by the named Opacus
    accountant: ``"rdp"`` (Rényi DP, an upper bound, fast), ``"prv"`` (privacy loss random
    variables, its upper bound; the tightest, slower on long runs) or ``"gdp"`` (Gaussian DP;
    experimental, can *underestimate*, constant sigma and q only).

    Call `record_step()` exactly once per released step, *before* releasing it. It checks the budget
    first (raising [`PrivacyBudgetExceeded`][sketchcomm.privacy.ledger.PrivacyBudgetExceeded]
    without recording anything if the step would exceed it), then records the step and, when the
    ledger writes a file, persists it atomically before returning. A crash after the write but
    before the release therefore leaves a record that over-reports by at most that step; no order of
    events makes it under-report.

    With a ``path`` that exists, the ledger is reloaded and continued, never reset; a file that is
    corrupt, of another schema, or written for another accountant, delta, unit, ``secure_mode`` or
    ``colluding_ranks`` raises [`LedgerError`][sketchcomm.privacy.ledger.LedgerError] and is left
    untouched. The ``budget`` argument replaces the budget stored in the file. In distributed
    training exactly one process writes a given file: every rank may hold a ledger, and only rank 0
    passes ``writer=True``.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.json"
    >>> ledger = PrivacyLedger("rdp", delta=1e-5, budget=8.0, path=path, colluding_ranks=1)
    >>> spent = ledger.record_step(1.0, 0.01, outsider_noise_multiplier=1.0 * 2**0.5)
    >>> ledger.steps, ledger.outsider_epsilon < ledger.epsilon == spent
    (1, True)
    >>> PrivacyLedger.open(path).colluding_ranks
    1

    Args:
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        delta: target δ, in (0, 1); below `1/n` for a dataset of `n` units.
        budget: ε budget on the guaranteed `epsilon`; ``None`` for none.
        path: JSON file the ledger is kept in; ``None`` to keep it in memory only.
        secure_mode: whether the noise is drawn from the operating system's cryptographically
            secure generator ([`add_noise()`][sketchcomm.privacy.mechanism.add_noise]). Recorded in
            the file and reports; the accounting is the same either way.
        colluding_ranks: ``t``, the ranks that may pool their noise shares against the others,
            that the guaranteed `epsilon` is stated for; ``None`` when not stated (older files).
        unit: the unit of privacy, e.g. ``"example"`` or ``"rank"``.
        dataset_size: number of units; when given, ``delta`` must be below ``1 / dataset_size``.
        writer: whether this instance writes ``path``.

    Raises:
        ValueError: on an invalid argument (the message names it).
        LedgerError: when ``path`` exists and cannot be continued.
    """

    def __init__(
        self,
        accountant: str,
        delta: float,
        budget: float | None = None,
        path: str | os.PathLike[str] | None = None,
        *,
        secure_mode: bool = False,
        colluding_ranks: int | None = None,
        unit: str = "example",
        dataset_size: int | None = None,
        writer: bool = True,
    ) -> None:
        self._accountant_name = check_accountant(accountant)
        self._dataset_size = (
            None if dataset_size is None else check_positive_int("dataset_size", dataset_size)
        )
        self._delta = check_delta(delta, self._dataset_size)
        self._budget = check_budget(budget)
        self._secure_mode = check_bool("secure_mode", secure_mode)
        self._colluding_ranks = (
            None if colluding_ranks is None else check_int("colluding_ranks", colluding_ranks, 0)
        )
        if not isinstance(unit, str) or not unit.strip():
            raise ValueError(f"unit must be a non-empty string, got {unit!r}")
        self._unit = unit
        self._writer = check_bool("writer", writer)
        self._path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._history: History = ()
        self._outsider_history: History = ()
        now = utc_now()
        self._created_at = now
        self._updated_at = now
        if self._accountant_name == "gdp":
            warnings.warn(
                "GDP accounting is experimental and can underestimate the privacy spent; "
                "prefer the rdp or prv accountant for guarantees (arXiv:2106.02848).",
                UserWarning,
                stacklevel=2,
            )
        if self._path is not None and (self._path.exists() or self._path.is_symlink()):
            state = read_ledger_file(self._path)
            self._history, self._outsider_history = check_ledger_parameters(
                state, self._parameters(), source=f"ledger file {self._path}"
            )
            self._created_at = state["created_at"]
            self._updated_at = state["updated_at"]
        elif self._path is not None and self._writer:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._persist(self._history, self._outsider_history, self._created_at, now)

    @property
    def accountant(self) -> str:
        r"""Name of the Opacus accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``."""
        return self._accountant_name

    @property
    def delta(self) -> float:
        r"""The δ that every ε of this ledger is stated for."""
        return self._delta

    @property
    def budget(self) -> float | None:
        r"""The ε budget on `epsilon`, or ``None``."""
        return self._budget

    @property
    def path(self) -> Path | None:
        r"""The ledger file, or ``None``."""
        return self._path

    @property
    def writer(self) -> bool:
        r"""Whether this instance writes `path`."""
        return self._writer

    @property
    def unit(self) -> str:
        r"""The unit of privacy."""
        return self._unit

    @property
    def secure_mode(self) -> bool:
        r"""Whether the noise is declared to come from the OS's cryptographically secure source."""
        return self._secure_mode

    @property
    def colluding_ranks(self) -> int | None:
        r"""``t``, the colluding ranks `epsilon` holds against (``None``: not stated)."""
        return self._colluding_ranks

    @property
    def dataset_size(self) -> int | None:
        r"""Number of units in the dataset, if given."""
        return self._dataset_size

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The recorded steps as Opacus keeps them, ``(noise_multiplier, sample_rate, count)``
        for each run of identical steps, with the guaranteed noise multiplier."""
        return list(self._history)

    @property
    def outsider_history(self) -> list[tuple[float, float, int]]:
        """The same steps with the noise multiplier an outside observer faces."""
        return list(self._outsider_history)

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return sum(count for _, _, count in self._history)

    @property
    def epsilon(self) -> float:
        r"""Guaranteed ε at `delta` (towards outside observers and any
        `colluding_ranks` colluding ranks), as the Opacus accountant computes it for
        `history`."""
        return cached_epsilon(self._accountant_name, self._delta, self._history)

    @property
    def outsider_epsilon(self) -> float:
        r"""ε at `delta` towards outside observers of the aggregate only,
        as the Opacus accountant computes it for `outsider_history`."""
        return cached_epsilon(self._accountant_name, self._delta, self._outsider_history)

    @property
    def budget_remaining(self) -> float | None:
        r"""Budget minus the guaranteed ε (at least 0), or ``None``."""
        return None if self._budget is None else max(0.0, self._budget - self.epsilon)

    @property
    def last_step(self) -> tuple[float, float] | None:
        """``(noise_multiplier, sample_rate)`` of the latest recorded step, or ``None``."""
        return self._history[-1][:2] if self._history else None

    def _planned(self, history: History, sigma: Any, sample_rate: Any, steps: Any) -> History:
        return stepped_history(
            self._accountant_name,
            history,
            check_noise_multiplier(sigma),
            check_sample_rate(sample_rate),
            check_positive_int("steps", steps),
        )

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        r"""Guaranteed ε after ``steps`` more steps with this (guaranteed) noise
        multiplier and sample rate. Records nothing.

        Raises:
            ValueError: on invalid arguments, or for the gdp accountant when they differ from
                the steps already recorded.
        """
        history = self._planned(self._history, noise_multiplier, sample_rate, steps)
        return cached_epsilon(self._accountant_name, self._delta, history)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        r"""Whether ``steps`` more steps would bring the guaranteed ε above the
        budget (always ``False`` without a budget; invalid arguments still raise)."""
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps)
        return self._budget is not None and epsilon > self._budget

    def record_step(
        self,
        noise_multiplier: float,
        sample_rate: float,
        *,
        outsider_noise_multiplier: float | None = None,
    ) -> float:
        r"""Account for one step, before its noisy result is released.

        Checks that the step keeps the guaranteed ε within the budget, records
        it and, when this instance writes a file, persists the ledger atomically. Only after this
        returns may the caller release the step; if it raises, nothing was recorded.

        Args:
            noise_multiplier: the guaranteed σ: noise standard deviation over the
                clipping norm that remains after `colluding_ranks` ranks remove their
                shares (e.g. [`noise_share_std()`][sketchcomm.privacy.mechanism.noise_share_std]
                shares).
            sample_rate: `q`, the probability with which each unit was included.
            outsider_noise_multiplier: the multiplier an outside observer faces
                ([`outsider_noise_multiplier()`][sketchcomm.privacy.mechanism.outsider_noise_multiplier]);
                default ``noise_multiplier``. Must not be below it.

        Returns:
            The guaranteed ε spent including this step.

        Raises:
            PrivacyBudgetExceeded: the step would exceed the budget.
            ValueError: invalid arguments, or for the gdp accountant, a change of noise
                multiplier or sample rate.
            OSError: the ledger file could not be written (the step is not recorded).
        """
        with self._lock:
            history = self._planned(self._history, noise_multiplier, sample_rate, 1)
            outsider = check_outsider_noise_multiplier(outsider_noise_multiplier, noise_multiplier)
            outsider_history = self._planned(self._outsider_history, outsider, sample_rate, 1)
            would_be = cached_epsilon(self._accountant_name, self._delta, history)
            if self._budget is not None and would_be > self._budget:
                raise PrivacyBudgetExceeded(
                    spent=self.epsilon,
                    budget=self._budget,
                    would_be=would_be,
                    delta=self._delta,
                    accountant=self._accountant_name,
                )
            now = utc_now()
            self._persist(history, outsider_history, self._created_at, now)
            self._history, self._outsider_history = history, outsider_history
            self._updated_at = now
            return would_be

    def state_dict(self) -> dict[str, Any]:
        """The ledger as a JSON-serialisable dict: exactly what the ledger file holds."""
        return self._state(
            self._history, self._outsider_history, self._created_at, self._updated_at
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from ``state_dict`` (as returned by `state_dict()`), then persist.

        The ledger never forgets steps: a state whose histories extend the current ones replaces
        them; a state whose histories are a prefix of the current ones (e.g. an older
        checkpoint) leaves the ledger as it is; any other state raises
        [`LedgerError`][sketchcomm.privacy.ledger.LedgerError]. The budget stays the one given to
        the constructor.

        Raises:
            LedgerError: if the state is malformed, belongs to another accountant, delta, unit,
                ``secure_mode`` or ``colluding_ranks``, or diverges from the recorded history.
        """
        with self._lock:
            state = validate_ledger_state(state_dict, source="state_dict")
            incoming = check_ledger_parameters(state, self._parameters(), source="state_dict")
            current = (self._history, self._outsider_history)
            if all(map(history_extends, current, incoming)):
                return
            if not all(map(history_extends, incoming, current)):
                raise LedgerError(
                    "state_dict diverges from the recorded history: neither is a prefix of the "
                    "other, so loading it would drop recorded steps"
                )
            now = utc_now()
            created_at = min(self._created_at, state["created_at"])
            self._persist(*incoming, created_at, now)
            self._history, self._outsider_history = incoming
            self._created_at = created_at
            self._updated_at = now

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writer: bool = False) -> PrivacyLedger:
        """Open an existing ledger file with the accountant, delta, budget, unit,
        ``secure_mode`` and ``colluding_ranks`` stored in it; read-only unless ``writer``.

        Raises:
            LedgerError: if the file is missing, unreadable or invalid.
        """
        file_path = Path(path)
        if not file_path.exists():
            raise LedgerError(f"ledger file {file_path} does not exist")
        state = read_ledger_file(file_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return cls(
                state["accountant"],
                state["delta"],
                state["budget"],
                file_path,
                secure_mode=state["secure_mode"],
                colluding_ranks=state["colluding_ranks"],
                unit=state["unit"],
                dataset_size=state["dataset_size"],
                writer=writer,
            )

    def _parameters(self) -> dict[str, Any]:
        return {
            "accountant": self._accountant_name,
            "delta": self._delta,
            "budget": self._budget,
            "unit": self._unit,
            "secure_mode": self._secure_mode,
            "colluding_ranks": self._colluding_ranks,
            "dataset_size": self._dataset_size,
        }

    def _state(
        self, history: History, outsider: History, created_at: str, updated_at: str
    ) -> dict[str, Any]:
        epsilons = [
            cached_epsilon(self._accountant_name, self._delta, h) for h in (history, outsider)
        ]
        return ledger_state(self._parameters(), history, outsider, epsilons, created_at, updated_at)

    def _persist(self, history: History, outsider: History, created: str, updated: str) -> None:
        """Write the file when this instance is its writer; nothing otherwise."""
        if self._path is not None and self._writer:
            write_ledger_file(self._path, self._state(history, outsider, created, updated))
