"""What the benchmark suites share: the machine's record with its GEMM ceiling (timed with experiments/timing.py's
interleaved timing, which the suites use too)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

from experiments import outputs
from experiments.timing import interleaved_times


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


def gemm_call(size: int) -> tuple[Callable, tuple, int]:
    """(jitted fn, args, flop) of a float32 (size x size) @ (size x size) matmul: the ceiling of a layer."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    return jax.jit(jnp.matmul), (a, a), 2 * size**3


def gemm_ceiling(size: int, repeats: int) -> dict:
    """GFLOP/s of the float32 GEMM of `gemm_call(size)` on its own."""
    fn, args, flop = gemm_call(size)
    t = interleaved_times({"gemm": (fn, args)}, repeats)["gemm"]
    return {
        "size": size,
        "dtype": "float32",
        "ms": t["ms"],
        "gflops": flop / t["ms"] / 1e6,
        "gflops_per_cpu_second": flop / t["cpu_ms"] / 1e6,
    }


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
