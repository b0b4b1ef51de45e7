"""Argument types shared by the benchmark commands: each parses one option value or raises
``argparse.ArgumentTypeError`` with a message that names the problem."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def size(text: str) -> int:
    """A vector size such as ``100000`` or ``1e5``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"a size must be a positive integer, got {text!r}")
    return int(value)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer option of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def bounded_float(low: float, high: float, *, open_low: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        above = value > low if open_low else value >= low
        if not (math.isfinite(value) and above and value <= high):
            bracket = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low:g}, {high:g}], got {text}")
        return value

    return parse
