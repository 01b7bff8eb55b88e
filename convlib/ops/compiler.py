"""The XLA compile options measured best for jitted programs of convlib convs, per platform.

XLA:CPU (JAX 0.10) hands 2-D convs with more than 16 channels to YNNPACK, which runs each on one core; with the
convs left to Eigen (multi-threaded) and only dots and reductions on YNNPACK, whole jitted training steps ran
17-59 % faster (docs/performance.md, "Compile options per jitted program"). The rules of :func:`convlib.ops.plan.plan`
are measured with these options.
"""

from __future__ import annotations

_CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def compiler_options(platform: str) -> dict[str, str]:
    """The XLA compile options for jitted programs of convlib convs on `platform` (a JAX platform name), for
    ``jax.jit(f, compiler_options=...)``: one program opts in, nothing process-wide changes. Empty on every platform
    but the CPU, where it keeps convs off YNNPACK.

    >>> compiler_options("cuda")
    {}
    >>> sorted(compiler_options("cpu"))
    ['xla_cpu_experimental_ynn_fusion_type']
    """
    if not isinstance(platform, str):
        raise TypeError(f"platform must be a JAX platform name such as 'cpu', got {platform!r}")
    return dict(_CPU_COMPILER_OPTIONS) if platform == "cpu" else {}
