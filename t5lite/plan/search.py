"""Searches over compiles: the largest global batch that fits, the cheapest remat that fits.

Both assume memory is monotone in the searched value (more batch -> more memory; a remat policy
that saves less -> less memory) and bisect, as MaxText's memory estimator does, so a search
costs O(log) compiles. `plan_fn(value) -> PlanResult` compiles one candidate.

Batch sizes are multiples of `unit` (the data-parallel positions x microbatches): the search
doubles from `start` until a plan does not fit (at most `limit`), then bisects between the last
fit and the first miss.

Example (with a fake planner whose peak grows with the batch)::

    >>> fits = lambda b: b <= 96
    >>> largest_fitting_batch(fits, start=16, unit=16, limit=4096)
    (96, 6)
"""

from __future__ import annotations

from collections.abc import Callable

# remat policies from the most saved (fastest, most memory) to the least saved
REMAT_ORDER = ("none", "dots", "dots_with_no_batch_dims", "save_projections",
               "save_attention_out", "full")


def largest_fitting_batch(fits: Callable[[int], bool], *, start: int, unit: int,
                          limit: int) -> tuple[int | None, int]:
    """(largest batch b, a multiple of unit, with fits(b); None if none) and compiles used."""
    compiles = 0

    def check(b: int) -> bool:
        nonlocal compiles
        compiles += 1
        return fits(b)

    lo_units = 0  # largest known fitting batch, in units (0 = none known)
    hi_units = None  # smallest known non-fitting batch, in units
    cur = max(start // unit, 1)
    if check(cur * unit):
        lo_units = cur
        while cur * 2 * unit <= limit:
            cur *= 2
            if check(cur * unit):
                lo_units = cur
            else:
                hi_units = cur
                break
        else:
            return lo_units * unit, compiles
    else:
        hi_units = cur
    while hi_units - lo_units > 1:
        mid = (lo_units + hi_units) // 2
        if check(mid * unit):
            lo_units = mid
        else:
            hi_units = mid
    return (lo_units * unit if lo_units else None), compiles


def cheapest_fitting_remat(fits: Callable[[str], bool],
                           order: tuple[str, ...] = REMAT_ORDER) -> tuple[str | None, int]:
    """(first policy in `order` with fits(policy); None if even the last does not fit) and
    compiles used, by bisection over the order."""
    compiles = 0
    lo, hi = -1, len(order) - 1  # order[hi] is the candidate; everything <= lo does not fit
    compiles += 1
    if not fits(order[hi]):
        return None, compiles
    while hi - lo > 1:
        mid = (lo + hi) // 2
        compiles += 1
        if fits(order[mid]):
            hi = mid
        else:
            lo = mid
    return order[hi], compiles
