"""Timing of compiled JAX functions: medians and minima of repeated calls after compilation, taken in turns.

Timing is interleaved: each round calls every function once, in turn, so a change in the load of a shared machine
falls on all of them alike and their ratios stay fair. Every call is waited for with `jax.block_until_ready`, so the
time is the computation's, not its dispatch. The wall time's median and minimum and the process CPU time's median
(all threads) are recorded. Other tenants of a machine only ever slow a call down, so the fastest of the repeats
(`best_ms`, as `timeit` advises) is the steadiest estimate of the work itself: on this project's shared 2-core
machine, one program's calls in 28 rounds spread over up to 1.8x, and two compilations of one program compared
by medians of 7 calls differed by up to 23 %, by minima of 14 calls by up to 5 % (docs/performance.md).

Two libraries in one process disturb each other through their idle threads: PyTorch's OpenMP workers spin for a
while after each call, on the very cores the next JAX call needs. With `lead_in=1` each timed call follows one
untimed call of the same function, so whatever ran before has gone quiet (2-core Intel Xeon, 2026-12-06, LeNet-5
training steps: JAX alone 10.3 ms, right after a PyTorch step 11.7 ms, after a lead-in call 10.35 ms; PyTorch
8.3-8.4 ms in all three).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import jax

from convlib.ops import compiler_options


def jit(fn: Callable, **kwargs) -> Callable:
    """`jax.jit` with convlib's measured compile options for the default backend (as `convlib.train` compiles its
    steps), so that every mode of a benchmark is timed as training runs it."""
    return jax.jit(fn, compiler_options=compiler_options(jax.default_backend()), **kwargs)


def interleaved_times(
    calls: dict[str, tuple[Callable, tuple]], repeats: int, warmup: int = 1, lead_in: int = 0
) -> dict[str, dict]:
    """Median and fastest wall milliseconds and median CPU milliseconds of each `fn(*args)` in `calls`
    (name -> (fn, args)), after `warmup` calls each (the first compiles); in each round every timed call follows
    `lead_in` untimed calls of its own function (for calls of different libraries, see the module's docstring).
    A PyTorch function must synchronise itself.
    Returns name -> {"ms": median wall, "best_ms": fastest wall, "cpu_ms": median process CPU time}.

    >>> import jax.numpy as jnp
    >>> times = interleaved_times({"sum": (jax.jit(jnp.sum), (jnp.ones(8),))}, repeats=3)
    >>> times["sum"]["best_ms"] <= times["sum"]["ms"]
    True
    """
    if repeats < 1 or warmup < 0 or lead_in < 0:
        raise ValueError(f"repeats must be >= 1, warmup and lead_in >= 0, got {repeats!r}, {warmup!r} and {lead_in!r}")
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            for _ in range(lead_in):
                jax.block_until_ready(fn(*args))
            start_cpu, start = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "ms": 1e3 * statistics.median(wall[name]),
            "best_ms": 1e3 * min(wall[name]),
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
        }
        for name in calls
    }


def median_times(calls: dict[str, tuple[Callable, tuple]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each `fn(*args)` in `calls` (name -> (fn, args)), timed in turns."""
    return {name: t["ms"] / 1e3 for name, t in interleaved_times(calls, repeats, warmup).items()}


def median_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `fn(*args)` over `repeats` calls, after `warmup` calls (the first compiles)."""
    return median_times({"fn": (fn, args)}, repeats, warmup)["fn"]


_METADATA = re.compile(r", metadata=\{[^}]*\}")
_NAME = re.compile(r"%[\w.\-]+|(?<=\()[\w.\-]+(?=: )|(?<=, )[\w.\-]+(?=: )")  # instructions, parameters
_SOURCE_TABLES = re.compile(r"^(\d+ |FileNames|FunctionNames|FileLocations|StackFrames)")


def compiled_program(fn: Callable, *args) -> tuple[str, ...]:
    """The instructions XLA compiles the jitted `fn` to for `args`, without names, metadata and source locations
    (sorted): two functions that compile to the same program compare equal, whichever Python built them, so a
    benchmark can say when two modes run the very same computation and their time ratio is the machine's noise."""
    text = _METADATA.sub("", fn.lower(*args).compile().as_text())
    lines = (_NAME.sub("%", line).strip() for line in text.splitlines())
    return tuple(
        sorted(line for line in lines if line and not line.startswith("HloModule") and not _SOURCE_TABLES.match(line))
    )
