"""The ``sketchcomm`` command.

Every sub-command lives in its own module, which exposes ``configure(parser)`` to declare its
options and ``run(args) -> int`` to execute. Those modules import their heavy dependencies
(transformers, wandb) inside ``run``, so ``sketchcomm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sketchcomm.demo.cli", "short private sketched DDP training on digits, with a report"),
    "privacy": ("sketchcomm.privacy.cli", "epsilon of a plan, noise for a target, ledger files"),
    "audit": ("sketchcomm.privacy.audit_cli", "empirical lower bound on epsilon against the claim"),
    "bench": ("sketchcomm.bench_cli", "benchmarks of a source checkout (its benchmarks/ folder)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketchcomm",
        description="Count Sketch DDP communication and differential privacy tools.",
    )
    add_subcommands(
        parser, COMMANDS, dest="command", metavar="COMMAND", module_attr="command_module"
    )
    return parser


def add_subcommands(
    parser: argparse.ArgumentParser,
    registry: dict[str, tuple[str, str]],
    *,
    dest: str,
    metavar: str,
    module_attr: str,
) -> None:
    """Declare one required sub-command per ``registry`` entry (name -> (module, help)).

    Each module's ``configure(parser)`` declares its options; the parsed namespace holds the
    chosen module under ``module_attr``, so that its ``run(args)`` can be called (pop it from the
    namespace first, so that the namespace holds only options).
    """
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    sub.required = True
    for name, (module_name, help_text) in registry.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.configure(command)
        command.set_defaults(**{module_attr: module})


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; its exit status."""
    args = build_parser().parse_args(argv)
    command = vars(args).pop("command_module")
    return int(command.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
