"""Differential privacy accounting: the epsilon of a training plan, the noise multiplier for a
target epsilon, and the contents of a privacy ledger file.

Every epsilon is stated for the given delta and accountant, for add/remove-one adjacency of the
unit of privacy under Poisson sampling at the given sample rate.
"""

from __future__ import annotations

import argparse
import json
import sys

from sketchcomm.privacy.accounting import ACCOUNTANTS
from sketchcomm.privacy.calibration import (
    calibrate_noise_multiplier,
    describe_plan,
    steps_for_epochs,
)
from sketchcomm.privacy.ledger import LedgerError, PrivacyLedger
from sketchcomm.privacy.ledger_file import epsilon_from_json
from sketchcomm.privacy.mechanism import NOISE_PLACEMENTS


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sample-rate",
        "-q",
        type=float,
        required=True,
        help="probability that a unit is in a step's batch (batch size / dataset size)",
    )
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="number of optimizer steps")
    length.add_argument("--epochs", type=float, help="number of epochs (epochs / q steps)")
    parser.add_argument("--delta", type=float, required=True, help="target delta")
    parser.add_argument(
        "--accountant", choices=ACCOUNTANTS, default="prv", help="Opacus accountant (default: prv)"
    )
    parser.add_argument(
        "--dataset-size", type=int, help="number of units; checks that delta < 1/dataset-size"
    )
    parser.add_argument("--unit", default="example", help="unit of privacy (default: example)")
    parser.add_argument(
        "--world-size", type=int, help="number of ranks W; states the epsilon towards the ranks"
    )
    parser.add_argument(
        "--colluding-ranks",
        type=int,
        help="ranks t that may pool their noise shares (default: 0 for examples, W - 1 for ranks)",
    )
    parser.add_argument(
        "--noise-placement",
        choices=NOISE_PLACEMENTS,
        default="distributed",
        help="every rank adds a share of the noise, or rank 0 adds all of it",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Declare the ``epsilon``, ``calibrate`` and ``inspect`` actions."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    epsilon = actions.add_parser(
        "epsilon",
        help="epsilon spent by a plan (noise multiplier, sample rate, steps)",
        description="Print the epsilon that a plan of --steps (or --epochs) Poisson-sampled "
        "Gaussian steps at noise multiplier --sigma and sample rate -q spends at --delta, with "
        "the chosen Opacus accountant.",
    )
    epsilon.add_argument(
        "--sigma",
        "--noise-multiplier",
        type=float,
        required=True,
        dest="sigma",
        help="noise multiplier: noise std / clipping norm",
    )
    _add_plan_arguments(epsilon)
    epsilon.add_argument("--budget", type=float, help="epsilon budget to compare with")

    calibrate = actions.add_parser(
        "calibrate",
        help="smallest noise multiplier whose epsilon is at most a target",
        description="Print the smallest noise multiplier whose plan spends at most "
        "--target-epsilon at --delta, and the plan it gives.",
    )
    calibrate.add_argument(
        "--target-epsilon",
        "--epsilon",
        type=float,
        required=True,
        dest="target_epsilon",
        help="epsilon the whole plan may spend at most",
    )
    _add_plan_arguments(calibrate)
    calibrate.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="how far below the target the plan's epsilon may be (default: 0.01)",
    )

    inspect = actions.add_parser(
        "inspect",
        help="show a privacy ledger file (read-only)",
        description="Print the privacy report of a ledger file: steps, epsilon at its delta "
        "with its accountant, unit and budget. The file is only read.",
    )
    inspect.add_argument("path", help="ledger JSON file")
    inspect.add_argument("--json", action="store_true", help="print the ledger as JSON")


def _steps(args: argparse.Namespace) -> int:
    if args.steps is not None:
        return args.steps
    return steps_for_epochs(args.epochs, args.sample_rate)


def _threat_model(args: argparse.Namespace) -> dict[str, object]:
    return {
        "world_size": args.world_size,
        "colluding_ranks": args.colluding_ranks,
        "noise_placement": args.noise_placement,
    }


def _run_epsilon(args: argparse.Namespace) -> int:
    print(
        describe_plan(
            args.sigma,
            args.sample_rate,
            _steps(args),
            args.delta,
            args.accountant,
            unit=args.unit,
            budget=args.budget,
            dataset_size=args.dataset_size,
            **_threat_model(args),
        )
    )
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    steps = _steps(args)
    sigma = calibrate_noise_multiplier(
        args.target_epsilon,
        args.delta,
        args.sample_rate,
        steps=steps,
        accountant=args.accountant,
        epsilon_tolerance=args.tolerance,
    )
    print(f"noise multiplier: {sigma!r}")
    print(
        describe_plan(
            sigma,
            args.sample_rate,
            steps,
            args.delta,
            args.accountant,
            unit=args.unit,
            budget=args.target_epsilon,
            dataset_size=args.dataset_size,
            **_threat_model(args),
        )
    )
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from sketchcomm.report import format_privacy_report

    ledger = PrivacyLedger.open(args.path)
    with open(args.path, encoding="utf-8") as handle:
        stored = json.load(handle)
    if args.json:
        print(json.dumps(stored, indent=2))
        return 0
    print(format_privacy_report(ledger))
    print(f"created {stored['created_at']}, updated {stored['updated_at']}")
    if epsilon_from_json(stored["epsilon"]) != ledger.epsilon:
        print(
            f"note: the file records epsilon {stored['epsilon']} (Opacus "
            f"{stored.get('opacus_version', 'unknown')}); the installed Opacus gives "
            f"{ledger.epsilon!r} for the same history, which is the value reported above"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; returns 0, or 2 with a message on stderr for invalid input."""
    handlers = {"epsilon": _run_epsilon, "calibrate": _run_calibrate, "inspect": _run_inspect}
    try:
        return handlers[args.action](args)
    except (LedgerError, ValueError) as err:
        print(f"sketchcomm privacy {args.action}: error: {err}", file=sys.stderr)
        return 2
