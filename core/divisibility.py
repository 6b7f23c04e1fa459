"""The one divisibility checker behind validation messages (sympy's number theory).

Every "X must divide Y" message names the values and the ones that would work, so the fix it
suggests is a value the user can paste. These run once per plan or per model, never per node.
"""

from __future__ import annotations

import sympy


def divisors(n: int) -> list[int]:
    """Every positive divisor of n, ascending."""
    return [int(d) for d in sympy.divisors(n)] if n > 0 else []


def proper_divisors(n: int) -> list[int]:
    """Divisors of n strictly between 1 and n (the sizes a sub-group of n ranks can take)."""
    return [d for d in divisors(n) if 1 < d < n]


def nearest_multiples(n: int, k: int) -> tuple[int, int]:
    """The multiples of k just below (at least k) and just above n: the nearest valid sizes."""
    below = max(k, n // k * k)
    above = -(-n // k) * k
    return below, above if above != below else above + k


def words(values: list[int]) -> str:
    """`1, 2, 4` for a message."""
    return ", ".join(map(str, values))
