r"""Differential privacy for sketched DDP communication.

:class:`DPSketchState` with :func:`dp_sketch_hook` clips and noises each bucket's Count Sketch
tables; :class:`PrivacyLedger` records every noisy step a run releases, computes the
:math:`(\varepsilon, \delta)` spent with an Opacus accountant (towards outside observers and
towards ``t`` colluding ranks), enforces an optional budget and keeps itself on disk;
:func:`calibrate_noise_multiplier`, :func:`plan_epsilon` and :func:`describe_plan` choose and
state the plan before training. The mechanism, the accounting helpers and the ledger's file
format live in :mod:`sketchcomm.privacy.mechanism`, :mod:`~sketchcomm.privacy.accounting`,
:mod:`~sketchcomm.privacy.calibration` and :mod:`~sketchcomm.privacy.ledger_file`.
"""

from sketchcomm.privacy.accounting import ACCOUNTANTS, PrivacyBudgetExceeded, epsilon_for_history
from sketchcomm.privacy.calibration import calibrate_noise_multiplier, describe_plan, plan_epsilon
from sketchcomm.privacy.hook import DPSketchState, dp_sketch_hook
from sketchcomm.privacy.ledger import LedgerError, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "DPSketchState",
    "LedgerError",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "describe_plan",
    "dp_sketch_hook",
    "epsilon_for_history",
    "plan_epsilon",
]
