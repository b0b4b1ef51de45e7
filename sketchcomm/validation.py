"""Argument checks: each takes ``(name, value, ...)``, returns the checked value (as the type it
stands for) and raises ``ValueError`` naming the parameter otherwise.

>>> check_int("steps", 3, 1)
3
>>> check_positive_float("budget", 8)
8.0
>>> check_float("sample_rate", 1.5, 0.0, 1.0, open_low=True)
Traceback (most recent call last):
...
ValueError: sample_rate must be a number in (0.0, 1.0], got 1.5
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_number",
    "check_positive_float",
    "check_positive_int",
]

Choice = TypeVar("Choice")


def check_choice(name: str, value: Choice, choices: tuple) -> Choice:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (Python or NumPy) ``>= minimum``."""
    result = _integer(value)
    if result is None or result < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return result


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer ``>= 1``."""
    result = _integer(value)
    if result is None or result < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return result


def check_number(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is a real number (not a bool, not NaN; may be infinite)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if math.isnan(result):
        raise ValueError(f"{name} must be a number, got NaN")
    return result


def check_float(name: str, value: Any, low: float, high: float, *, open_low: bool) -> float:
    """``value`` as a ``float`` if it is finite and in ``(low, high]`` (``open_low``) or
    ``[low, high]``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is finite and ``> 0``."""
    result = check_number(name, value)
    if not (result > 0.0 and math.isfinite(result)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return result
