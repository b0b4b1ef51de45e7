"""Whether a table is finite, on the CPU in one vectorized pass.

An fp32 value is infinite or NaN iff its 8 exponent bits are all ones; adding one to the lowest
exponent bit then carries into bit 31, which no finite value's exponent does. The OR of those
sums over the table has bit 31 clear iff every value is finite. An OR of integers vectorizes,
where a float reduction (e.g. the sum of ``x * 0``) is a chain of dependent additions.

>>> import numpy as np
>>> table = np.array([[1.0, -3e38]], dtype=np.float32)
>>> all_finite(table), all_finite(np.append(table, np.float32("inf")))
(True, False)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sketchcomm.compiled import available, jit

__all__ = ["all_finite", "tensor_is_finite"]

_EXPONENT = np.uint32(0x7F800000)
_EXPONENT_LOW_BIT = np.uint32(0x00800000)
_SIGN_BIT = np.uint32(0x80000000)


@jit()
def _all_finite(cells):
    bits = cells.ravel().view(np.uint32)
    carried = np.uint32(0)
    for i in range(len(bits)):
        carried |= (bits[i] & _EXPONENT) + _EXPONENT_LOW_BIT
    return carried < _SIGN_BIT


def all_finite(cells: np.ndarray) -> bool:
    """Whether every element of ``cells`` (C-contiguous fp32) is finite; compiled when numba
    is installed (without it, a Python loop: call [`tensor_is_finite()`][
    sketchcomm.finite.tensor_is_finite] instead)."""
    return bool(_all_finite(cells))


def tensor_is_finite(table: Tensor) -> bool:
    """Whether every element of ``table`` is finite: one compiled pass for a contiguous fp32
    CPU tensor when numba is installed, ``torch.isfinite`` otherwise (any device or dtype)."""
    if (
        table.device.type == "cpu"
        and table.dtype == torch.float32
        and table.is_contiguous()
        and available()
    ):
        return all_finite(table.numpy())
    return bool(torch.isfinite(table).all())
