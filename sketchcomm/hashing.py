"""Seeds and column counts for Count Sketch hashing: a stable seed derivation that every process
computes alike, and the prime column counts that make the chunk-rolled bucket hash pairwise
independent (see [`sketchcomm.sketch`][sketchcomm.sketch]).

>>> prime_at_most(100), derive_seed("bucket", 3) == derive_seed("bucket", 3)
(97, True)
"""

from __future__ import annotations

import hashlib
import math

__all__ = ["derive_seed", "prime_at_most"]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % f for f in range(3, math.isqrt(n) + 1, 2))


def prime_at_most(n: int) -> int:
    """The largest prime ``<= n`` (``n >= 2``); primes are dense, so this stays close to ``n``."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    while not _is_prime(n):
        n -= 1
    return n


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a stable function of ``parts`` (same on every process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
