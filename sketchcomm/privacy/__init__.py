r"""Differential privacy accounting for sketched DDP communication.

:class:`PrivacyLedger` records every noisy step a run releases, computes the
:math:`(\varepsilon, \delta)` spent with an Opacus accountant, enforces an optional budget and
keeps itself on disk; :mod:`sketchcomm.privacy.calibration` chooses the noise multiplier before
training and states the plan.
"""

from sketchcomm.privacy.calibration import (
    calibrate_noise_multiplier,
    describe_plan,
    plan_epsilon,
    steps_for_epochs,
)
from sketchcomm.privacy.hook import DPSketchState, dp_sketch_hook
from sketchcomm.privacy.ledger import (
    ACCOUNTANT_DESCRIPTIONS,
    ACCOUNTANTS,
    LEDGER_FORMAT,
    LEDGER_SCHEMA_VERSION,
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    epsilon_for_history,
)

__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_DESCRIPTIONS",
    "LEDGER_FORMAT",
    "LEDGER_SCHEMA_VERSION",
    "DPSketchState",
    "LedgerError",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "describe_plan",
    "dp_sketch_hook",
    "epsilon_for_history",
    "plan_epsilon",
    "steps_for_epochs",
]
