"""Whether and how the compiled CPU kernels run (numba).

The kernels of [`sketchcomm.sketch_compiled`][sketchcomm.sketch_compiled] and
[`sketchcomm.gear.decode_compiled`][sketchcomm.gear.decode_compiled] are compiled with
[`jit()`][sketchcomm.compiled.jit] on first use and cached on disk. They run when
[`available()`][sketchcomm.compiled.available] is true: numba is importable and the environment
variable ``SKETCHCOMM_KERNELS`` is not ``numpy``; otherwise their numpy or torch paths run.

>>> import os
>>> available() == (numba is not None and os.environ.get(ENVIRONMENT_VARIABLE) != "numpy")
True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:
    import numba
except ImportError:  # the numpy and torch paths run instead
    numba = None

__all__ = ["ENVIRONMENT_VARIABLE", "available", "jit", "numba"]

#: ``SKETCHCOMM_KERNELS=numpy`` forces the numpy and torch paths even where numba is installed.
ENVIRONMENT_VARIABLE = "SKETCHCOMM_KERNELS"


def available() -> bool:
    """Whether the compiled kernels run: numba is importable and ``SKETCHCOMM_KERNELS`` is not
    ``numpy``."""
    return numba is not None and os.environ.get(ENVIRONMENT_VARIABLE, "") != "numpy"


def jit(**options: Any) -> Callable[[Callable], Callable]:
    """numba's ``njit`` (cached on disk, no GIL, no bounds checks, plus ``options``); without
    numba, the function itself."""
    return lambda fn: (
        fn
        if numba is None
        else numba.njit(cache=True, nogil=True, boundscheck=False, **options)(fn)
    )
