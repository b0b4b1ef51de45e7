r"""Reporting the privacy spent and the bytes communicated, to Weights & Biases and as text.

:class:`PrivacyReporter` logs, once per step, what a :class:`~sketchcomm.privacy.PrivacyLedger`
has recorded (the guaranteed :math:`\varepsilon`, towards outside observers and ``t`` colluding
ranks, and the :math:`\varepsilon` towards outside observers only, both at the ledger's
:math:`\delta`; the step's noise multiplier and sample rate, the number of steps, the budget
left) together with communication figures supplied by the caller, and at the end a summary
table and run summary values. Only rank 0 logs; on other ranks every method does nothing, so
training code can call it unconditionally.

:func:`format_privacy_report` renders the same facts as plain text for the console.

wandb is imported only when a reporter on rank 0 is created.
"""

from __future__ import annotations

import math
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sketchcomm.privacy.accounting import ACCOUNTANT_DESCRIPTIONS
from sketchcomm.privacy.ledger import PrivacyLedger

__all__ = [
    "PrivacyReporter",
    "format_privacy_report",
    "resolve_wandb_mode",
    "wandb_credentials_available",
]

_DEFAULT_BASE_URL = "https://api.wandb.ai"
_WANDB_MODES = ("online", "offline", "disabled")


def _netrc_path() -> Path:
    if env_path := os.environ.get("NETRC"):
        return Path(env_path).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        candidate = Path(name).expanduser()
        if candidate.exists():
            return candidate
    return Path("~/.netrc").expanduser()


def wandb_credentials_available() -> bool:
    """Whether wandb has credentials without prompting: ``WANDB_API_KEY`` or
    ``WANDB_IDENTITY_TOKEN_FILE`` is set, or the netrc file has an entry for the wandb host
    (``WANDB_BASE_URL``, by default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_BASE_URL).netloc
    try:
        entry = netrc.netrc(str(_netrc_path())).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None and bool(entry[2])


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The wandb mode to run in: ``mode`` if given, else ``WANDB_MODE`` if set, else
    ``"online"`` when credentials are available and ``"offline"`` otherwise, so that a run
    without an API key never waits for a login prompt."""
    if mode is not None:
        if mode not in _WANDB_MODES:
            raise ValueError(f"mode must be one of {', '.join(_WANDB_MODES)}, got {mode!r}")
        return mode
    if env_mode := os.environ.get("WANDB_MODE"):
        return env_mode
    return "online" if wandb_credentials_available() else "offline"


def _colluding_value(ledger: PrivacyLedger) -> int | str:
    """``t`` for wandb, ``"unknown"`` for a ledger that did not record it."""
    return "unknown" if ledger.colluding_ranks is None else ledger.colluding_ranks


def _current_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _epsilon_text(epsilon: float, digits: int = 6) -> str:
    return f"{epsilon:.{digits}g}" if math.isfinite(epsilon) else "infinite"


def _threat_text(ledger: PrivacyLedger) -> str:
    if ledger.colluding_ranks is None:
        return "not recorded (a ledger from before threat models were recorded)"
    if ledger.colluding_ranks == 0:
        return "t = 0: the ranks are trusted; holds towards outside observers"
    return f"t = {ledger.colluding_ranks} colluding rank(s) that pool their noise shares"


def _guarantee_line(ledger: PrivacyLedger) -> str:
    t = ledger.colluding_ranks
    epsilon = f"({_epsilon_text(ledger.epsilon, 4)}, {ledger.delta:g})-DP"
    outsiders = f"({_epsilon_text(ledger.outsider_epsilon, 4)}, {ledger.delta:g})-DP"
    if t == 0:
        towards = f"{epsilon} for each {ledger.unit} (add/remove-one adjacency) towards outside "
        towards += "observers of the models and the summed tables, with the ranks trusted (t = 0)"
    else:
        who = "an unrecorded number of" if t is None else f"any {t}"
        towards = (
            f"{epsilon} for each {ledger.unit} (add/remove-one adjacency) towards outside "
            f"observers and {who} colluding rank(s), and {outsiders} towards outside observers "
            "of the models and the summed tables only"
        )
    return (
        f"The {ledger.steps} recorded steps are {towards}, under the {ledger.accountant} "
        "accountant, provided each released step is the clipped, noised update recorded here. "
        "Sketching or compression of the noised update is post-processing and adds no privacy "
        "of its own."
    )


def format_privacy_report(ledger: PrivacyLedger, *, comm: Mapping[str, float] | None = None) -> str:
    r"""Return a plain-text report of what ``ledger`` has recorded, to print at the end of a run.

    States the unit of privacy, accountant, :math:`\delta`, the threat model (``t`` colluding
    ranks), both :math:`\varepsilon` (towards outside observers, and the guaranteed one towards
    ``t`` colluding ranks, which the budget applies to), the budget, the history of noise
    multipliers and sample rates, and the guarantee they add up to.

    Args:
        ledger: the run's ledger.
        comm: communication totals to include, e.g. ``{"bytes_sent": 1.2e9}``.
    """
    lines = [
        "Privacy report",
        f"  unit of privacy   : one {ledger.unit} (add/remove-one adjacency, Poisson sampling)",
        f"  accountant        : {ledger.accountant}, {ACCOUNTANT_DESCRIPTIONS[ledger.accountant]}",
        f"  delta             : {ledger.delta:g}",
        f"  threat model      : {_threat_text(ledger)}",
        f"  steps             : {ledger.steps}",
        f"  epsilon, outsiders: {_epsilon_text(ledger.outsider_epsilon)}  (observers of the "
        "models and the summed tables)",
        f"  epsilon, t ranks  : {_epsilon_text(ledger.epsilon)}  (guaranteed: outsiders and the "
        "t colluding ranks; the budget applies to it)",
    ]
    if ledger.budget is not None:
        lines.append(
            f"  epsilon budget    : {ledger.budget:g}  (remaining {ledger.budget_remaining:.6g})"
        )
    source = (
        "the operating system's CSPRNG"
        if ledger.secure_mode
        else "a torch.Generator seeded from the operating system (not cryptographically secure)"
    )
    lines.append(f"  noise source      : {source}")
    if ledger.path is not None:
        lines.append(f"  ledger file       : {ledger.path}")
    histories = [("history", ledger.history)]
    if ledger.outsider_history != ledger.history:
        histories = [
            ("history, t ranks", ledger.history),
            ("history, outsiders", ledger.outsider_history),
        ]
    for label, history in histories if ledger.history else []:
        lines.append(f"  {label:<18}: noise multiplier, sample rate, steps")
        lines.extend(f"      {sigma:<12g} {q:<12g} {count}" for sigma, q, count in history)
    for key, value in (comm or {}).items():
        lines.append(f"  comm/{key:<12}: {value:g}")
    lines.append(_guarantee_line(ledger))
    return "\n".join(lines)


class PrivacyReporter:
    r"""Logs a ledger's privacy figures and the caller's communication figures to wandb.

    Per call of :meth:`log_step`, at wandb step ``ledger.steps``: ``privacy/epsilon`` (the
    guaranteed :math:`\varepsilon` at ``privacy/delta``, towards outside observers and the
    ledger's ``t`` colluding ranks, logged in the config as ``privacy/colluding_ranks``),
    ``privacy/outsider_epsilon`` (towards outside observers only), ``privacy/delta``,
    ``privacy/noise_multiplier`` and ``privacy/sample_rate`` (of the latest step),
    ``privacy/steps``, ``privacy/budget_remaining`` (with a budget), and ``comm/<key>`` for each
    entry of the ``comm`` dict (e.g. ``bytes_sent``, ``compression_ratio``). :meth:`finish` logs
    the tables ``privacy/summary``, ``privacy/history`` and ``privacy/outsider_history``, sets the
    run summary and closes the run.

    >>> import tempfile
    >>> from sketchcomm.privacy import PrivacyLedger
    >>> ledger = PrivacyLedger("rdp", delta=1e-5, colluding_ranks=0)
    >>> _ = ledger.record_step(1.0, 0.01)
    >>> with PrivacyReporter(ledger, mode="disabled", dir=tempfile.mkdtemp(), rank=0) as reporter:
    ...     logged = reporter.log_step({"bytes_sent": 1024})
    >>> logged["privacy/outsider_epsilon"] == ledger.outsider_epsilon, logged["comm/bytes_sent"]
    (True, 1024.0)

    Only rank 0 logs. ``rank`` defaults to ``torch.distributed.get_rank()`` when a process group
    is initialised, else 0; on any other rank no run is created, wandb is not imported and every
    method does nothing, and ``ledger`` may be ``None``.

    The wandb mode is ``mode`` if given, else ``WANDB_MODE`` if set, else online with
    credentials and offline without (see :func:`resolve_wandb_mode`).

    Args:
        ledger: the run's ledger.
        project: wandb project.
        name: wandb run name.
        config: extra run config; the ledger's accountant, delta, budget, unit, secure_mode and
            colluding_ranks are added.
        dir: directory wandb writes its run files under.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``.
        rank: this process's rank.
        **init_kwargs: further arguments for ``wandb.init`` (e.g. ``group``, ``tags``).
    """

    def __init__(
        self,
        ledger: PrivacyLedger | None,
        *,
        project: str = "sketchcomm",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        dir: str | os.PathLike[str] | None = None,
        mode: str | None = None,
        rank: int | None = None,
        **init_kwargs: Any,
    ) -> None:
        self._rank = _current_rank() if rank is None else rank
        self._ledger = ledger
        self._run: Any = None
        self._finished = False
        self._step = 0
        self._comm_sums: dict[str, float] = {}
        self._comm_counts: dict[str, int] = {}
        if not self.enabled:
            return
        if ledger is None:
            raise ValueError("ledger is required on rank 0")
        import wandb

        run_config = {
            "privacy/accountant": ledger.accountant,
            "privacy/delta": ledger.delta,
            "privacy/budget": ledger.budget,
            "privacy/unit": ledger.unit,
            "privacy/secure_mode": ledger.secure_mode,
            "privacy/colluding_ranks": _colluding_value(ledger),
            **dict(config or {}),
        }
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project,
            name=name,
            config=run_config,
            dir=None if dir is None else str(dir),
            mode=resolve_wandb_mode(mode),
            **init_kwargs,
        )

    @property
    def enabled(self) -> bool:
        """Whether this process logs (rank 0)."""
        return self._rank == 0

    @property
    def run(self) -> Any:
        """The wandb run, or ``None`` on ranks other than 0."""
        return self._run

    def log_step(
        self, comm: Mapping[str, float] | None = None, *, step: int | None = None
    ) -> dict[str, float] | None:
        """Log the ledger's current figures and ``comm`` (keys logged as ``comm/<key>``), at
        wandb step ``step`` (default: the ledger's step count). Call after
        :meth:`PrivacyLedger.record_step`. Returns the logged values, or ``None`` off rank 0."""
        if not self.enabled:
            return None
        if self._finished:
            raise RuntimeError("log_step called after finish()")
        ledger = self._ledger
        metrics: dict[str, float] = {
            "privacy/epsilon": ledger.epsilon,
            "privacy/outsider_epsilon": ledger.outsider_epsilon,
            "privacy/delta": ledger.delta,
            "privacy/steps": ledger.steps,
        }
        if (last := ledger.last_step) is not None:
            metrics["privacy/noise_multiplier"], metrics["privacy/sample_rate"] = last
        if (remaining := ledger.budget_remaining) is not None:
            metrics["privacy/budget_remaining"] = remaining
        for key, value in (comm or {}).items():
            number = float(value)
            metrics[f"comm/{key}"] = number
            self._comm_sums[key] = self._comm_sums.get(key, 0.0) + number
            self._comm_counts[key] = self._comm_counts.get(key, 0) + 1
        self._step = ledger.steps if step is None else step
        self._run.log(metrics, step=self._step)
        return metrics

    def finish(self) -> None:
        """Log the summary tables, set the run summary and close the run. Idempotent."""
        if not self.enabled or self._finished:
            return
        self._finished = True
        import wandb

        ledger = self._ledger
        summary: dict[str, Any] = {
            "privacy/epsilon": ledger.epsilon,
            "privacy/outsider_epsilon": ledger.outsider_epsilon,
            "privacy/colluding_ranks": _colluding_value(ledger),
            "privacy/delta": ledger.delta,
            "privacy/accountant": ledger.accountant,
            "privacy/unit": ledger.unit,
            "privacy/steps": ledger.steps,
            "privacy/secure_mode": ledger.secure_mode,
        }
        if ledger.budget is not None:
            summary["privacy/budget"] = ledger.budget
            summary["privacy/budget_remaining"] = ledger.budget_remaining
        for key, total in self._comm_sums.items():
            summary[f"comm/total_{key}"] = total
            summary[f"comm/mean_{key}"] = total / self._comm_counts[key]
        try:
            summary_table = wandb.Table(
                columns=["quantity", "value"],
                data=[[key, str(value)] for key, value in summary.items()],
            )
            tables = {
                f"privacy/{name}": wandb.Table(
                    columns=["noise_multiplier", "sample_rate", "steps"],
                    data=[list(entry) for entry in history],
                )
                for name, history in (
                    ("history", ledger.history),
                    ("outsider_history", ledger.outsider_history),
                )
            }
            self._run.log({"privacy/summary": summary_table, **tables}, step=self._step)
            self._run.summary.update(summary)
        finally:
            self._run.finish()

    def __enter__(self) -> PrivacyReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()
