"""Wall-clock timing of compiled JAX functions: the median of repeated calls after compilation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls, after `warmup` calls (the first compiles).

    Every call is waited for with `jax.block_until_ready`, so the time is the computation's, not its dispatch.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats!r} and {warmup!r}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
