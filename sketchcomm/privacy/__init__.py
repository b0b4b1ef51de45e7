r"""Differential privacy for sketched DDP communication.

[`DPSketchState`][sketchcomm.privacy.DPSketchState] with
[`dp_sketch_hook()`][sketchcomm.privacy.dp_sketch_hook] clips and noises each bucket's Count Sketch
tables; [`PrivacyLedger`][sketchcomm.privacy.PrivacyLedger] records every noisy step a run releases,
computes the `(ε, δ)` spent with an Opacus accountant (towards outside observers and
towards ``t`` colluding ranks), enforces an optional budget and keeps itself on disk;
[`calibrate_noise_multiplier()`][sketchcomm.privacy.calibrate_noise_multiplier],
[`plan_epsilon()`][sketchcomm.privacy.plan_epsilon] and
[`describe_plan()`][sketchcomm.privacy.describe_plan] choose and state the plan before training. The
mechanism, the accounting helpers and the ledger's file format live in
[`sketchcomm.privacy.mechanism`][sketchcomm.privacy.mechanism],
[`accounting`][sketchcomm.privacy.accounting], [`calibration`][sketchcomm.privacy.calibration] and
[`ledger_file`][sketchcomm.privacy.ledger_file].
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
