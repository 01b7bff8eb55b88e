"""What the benchmark suites share: the machine's record with its GEMM ceiling, and interleaved timing.

Timing is interleaved: each round calls every function once, in turn, so a change in the load of a shared
machine falls on all of them alike and their ratios stay fair. Both the wall time and the process CPU time
(all threads) of each call are recorded; the CPU time is the steadier of the two on a busy machine.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/: outputs

import outputs  # noqa: E402


def torch_module():
    """PyTorch if importable and on JAX's kind of device (CUDA when JAX runs on a GPU), else None."""
    try:
        import torch
    except ImportError:
        return None
    if jax.default_backend() != "cpu" and not torch.cuda.is_available():
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def torch_device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def interleaved_times(calls: dict[str, tuple[Callable, tuple]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Median wall and CPU milliseconds of each `fn(*args)` in `calls` (name -> (fn, args)), after `warmup`
    calls each (the first compiles). Results are waited for with `jax.block_until_ready`; a PyTorch function
    must synchronise itself. Returns name -> {"ms": wall, "cpu_ms": process CPU time}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats!r} and {warmup!r}")
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start_cpu, start = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"ms": 1e3 * statistics.median(wall[name]), "cpu_ms": 1e3 * statistics.median(cpu[name])}
            for name in calls}


def gemm_call(size: int) -> tuple[Callable, tuple, int]:
    """(jitted fn, args, flop) of a float32 (size x size) @ (size x size) matmul: the ceiling of a layer."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    return jax.jit(jnp.matmul), (a, a), 2 * size**3


def gemm_ceiling(size: int, repeats: int) -> dict:
    """GFLOP/s of the float32 GEMM of `gemm_call(size)` on its own."""
    fn, args, flop = gemm_call(size)
    t = interleaved_times({"gemm": (fn, args)}, repeats)["gemm"]
    return {"size": size, "dtype": "float32", "ms": t["ms"], "gflops": flop / t["ms"] / 1e6,
            "gflops_per_cpu_second": flop / t["cpu_ms"] / 1e6}


def record(gemm: dict) -> dict:
    """The machine (CPU model or GPU name, cores, versions, date) with its GEMM ceiling and PyTorch's version."""
    torch = torch_module()
    info = outputs.machine()
    info["torch"] = torch.__version__ if torch is not None else None
    info["gemm"] = gemm
    return info


def short_name(info: dict) -> str:
    """A file-name stem for the machine, e.g. 'cpu-amd-epyc' or 'gpu-nvidia-h100-80gb-hbm3'."""
    what = info["cpu"] if info["backend"] == "cpu" else info["device"]
    words = re.sub(r"\(r\)|\(tm\)|processor|cpu @.*|\d+-core", " ", what.lower())
    stem = "-".join(re.findall(r"[a-z0-9]+", words)[:4])
    return f"{info['backend']}-{stem or 'unknown'}"


def gflops(flop: float, ms: float) -> float:
    return flop / ms / 1e6
