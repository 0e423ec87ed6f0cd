"""One timing helper shared by the benchmarks (no JAX import: the caller blocks on its results)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one warm-up (compiling) call.
    `fn` must wait for its own results (e.g. `jax.block_until_ready`)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
