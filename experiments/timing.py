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


def median_times(calls: dict[str, tuple[Callable, tuple]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each `fn(*args)` in `calls` (name -> (fn, args)), timed in turns: one call of each per
    round, so that a change in the machine's load falls on all of them alike (fairer ratios on a shared machine)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats!r} and {warmup!r}")
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
