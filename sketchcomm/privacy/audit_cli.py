"""Empirical privacy audit of the private sketch hook: many one-step runs of DPSketchState +
dp_sketch_hook on a small DDP model (a variant: one layer, a token model, several buckets, or
unit="rank") with and without a canary, the best threshold test on the canary's projection, and
a Clopper-Pearson lower bound on epsilon set against the ledger's claim (per training example or
per rank, add/remove-one adjacency, sample rate 1), optionally with a fault planted in the hook.
Exit status 1 when the lower bound exceeds the claim, i.e. the claim is refuted at the stated
confidence.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sketchcomm.privacy.audit import AuditResult

_HELP = {
    "variant": "what is audited: linear (nn.Linear(dim, 1) on [B, dim], one bucket), tokens "
    "(the same layer on every token of [B, tokens, dim], the canary one example spread over its "
    "tokens), buckets (buckets blocks of dim/buckets parameters, one DDP bucket each, the canary "
    "spanning them), rank (unit='rank' on 2 or more ranks, rank 0's whole data the canary or "
    "nothing) (default %(default)s)",
    "fault": "a fault planted in the hook that its ledger cannot see, to check that the audit "
    "detects it: none (honest), no-noise, half-noise, clip-split (every bucket clipped to the "
    "full C instead of C sqrt(d_b/D); needs several buckets) (default %(default)s)",
    "trials": "one-step runs in all, half with the canary; the first half picks the threshold, "
    "the second half bounds its error rates (default %(default)s: about 30 s of CPU time)",
    "noise_multiplier": "sigma of the claim: the claimed epsilon is the ledger's for one step at "
    "this noise multiplier and sample rate 1 (default %(default)s)",
    "noise_scale": "fraction of sigma actually configured in the hook, to check that the audit "
    "catches too little noise: 1 honest, 0.5 half the noise, 0 none; the claim is unchanged "
    "(default %(default)s)",
    "max_grad_norm": "clipping norm C of each example's sketch table (default %(default)s)",
    "compression": "bucket elements per table cell of the one-row sketch; 1 for an exact, "
    "uncompressed table (default %(default)s)",
    "delta": "delta of the claim and of the lower bound (default %(default)s)",
    "accountant": "Opacus accountant of the ledger that makes the claim (default %(default)s)",
    "confidence": "confidence of the lower bound; split equally between the Clopper-Pearson "
    "bounds of the two error rates (default %(default)s)",
    "world": "number of gloo processes; each adds its share of the noise (default %(default)s)",
    "dim": "parameters of the audited model (default %(default)s)",
    "background": "fixed background examples per rank besides the canary (default %(default)s)",
    "tokens": "tokens per example of the tokens variant (default %(default)s)",
    "buckets": "parameter blocks, each its own DDP bucket, of the buckets variant "
    "(default %(default)s)",
    "seed": "seed of the data, canary coordinate, trial order and hashes; the noise is drawn "
    "from the operating system as in training (default %(default)s)",
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``sketchcomm audit``."""
    from sketchcomm.privacy import ACCOUNTANTS
    from sketchcomm.privacy.audit import AuditConfig
    from sketchcomm.privacy.audit_faults import FAULTS
    from sketchcomm.privacy.audit_variants import VARIANTS

    choices = {"accountant": ACCOUNTANTS, "variant": tuple(VARIANTS), "fault": FAULTS}
    defaults = AuditConfig()
    for field in fields(AuditConfig):
        value = getattr(defaults, field.name)
        option = "--" + field.name.replace("_", "-")
        if field.name in choices:
            parser.add_argument(
                option, choices=choices[field.name], default=value, help=_HELP[field.name]
            )
        else:
            parser.add_argument(option, type=type(value), default=value, help=_HELP[field.name])
    parser.add_argument(
        "--json", metavar="PATH", help="also write the configuration and results as JSON"
    )


def _epsilon(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "inf"


def report(result: AuditResult) -> str:
    """The text report of one [`AuditResult`][sketchcomm.privacy.audit.AuditResult]."""
    from sketchcomm.privacy.audit_variants import VARIANTS

    config, test = result.config, result.test
    shapes = sorted(set(result.table_shapes))
    tables = ", ".join(f"{rows}x{columns}" for rows, columns in shapes)
    sigma = config.configured_noise_multiplier
    needed = result.trials_to_exceed_claim
    lines = [
        f"variant {config.variant}: {VARIANTS[config.variant].summary}; fault: {config.fault}",
        f"mechanism: DPSketchState unit={config.unit}, C={config.max_grad_norm:g}, sample rate 1, "
        f"{config.world} rank(s), {len(result.table_shapes)} bucket(s) of tables {tables} for "
        f"{config.dim} parameters, configured sigma={sigma:g} ({config.noise_scale:g} x the "
        f"claimed {config.noise_multiplier:g}; the hook adds sigma="
        f"{config.effective_noise_multiplier:g})",
        f"claimed epsilon: {_epsilon(result.claimed_epsilon)} at delta={config.delta:g} "
        f"({config.accountant} accountant, one step, sigma={config.noise_multiplier:g}, per "
        f"{config.unit}); "
        f"the ledger of the configured hook records {_epsilon(result.ledger_epsilon)}",
        f"scores: shift with the canary {result.score_shift:.3f} C, std without it "
        f"{result.score_std:.3f} C (expected {result.predicted_shift:g} and "
        f"{result.predicted_std:g})",
        f"threshold {test.threshold:.4g} chosen on {config.trials // 2} trials; evaluated on "
        f"{test.negatives} without and {test.positives} with the canary:",
        f"  false positives {test.false_positives}/{test.negatives} (FPR {test.fpr:.4f}, "
        f"upper {test.fpr_upper:.4f}); false negatives {test.false_negatives}/{test.positives} "
        f"(FNR {test.fnr:.4f}, upper {test.fnr_upper:.4f}); one-sided Clopper-Pearson at "
        f"{(1 - config.confidence) / 2:g} each",
        f"epsilon lower bound: {test.epsilon_lower_bound:.3f} at {config.confidence:.0%} "
        f"confidence (expected for this noise and number of trials: "
        f"{_epsilon(result.expected_lower_bound)}); "
        + (
            f"trials to exceed the claim at this noise: about {needed:,}"
            if needed is not None
            else "no number of trials makes this test exceed the claim at this noise"
        ),
    ]
    if result.violated:
        verdict = (
            f"VIOLATION: lower bound {test.epsilon_lower_bound:.3f} > claimed "
            f"{_epsilon(result.claimed_epsilon)}: the claim is refuted at "
            f"{config.confidence:.0%} confidence"
        )
    else:
        verdict = (
            f"CONSISTENT: lower bound {test.epsilon_lower_bound:.3f} <= claimed "
            f"{_epsilon(result.claimed_epsilon)}: no violation detected"
        )
    lines.append(f"verdict: {verdict} ({result.seconds:.1f} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the audit, print the report; 0 when consistent, 1 on a violation, 2 on bad input."""
    from sketchcomm.privacy.audit import AuditConfig, run_audits, write_json

    try:
        config = AuditConfig(**{f.name: getattr(args, f.name) for f in fields(AuditConfig)})
    except ValueError as error:
        print(f"sketchcomm audit: error: {error}", file=sys.stderr)
        return 2
    (result,) = run_audits([config])
    print(report(result))
    if args.json:
        write_json([result], args.json)
    return 1 if result.violated else 0
