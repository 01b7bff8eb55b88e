"""Faster exact backward formulations of :func:`convlib.ops.conv` (`backward="custom"`).

Same notation as :mod:`convlib.ops.conv`: per spatial dim the input has size
`H`, the kernel `K` with dilation `d`, stride `s`, padding `(lo, hi)`, output
`H_out`, and `G = dE/dY`. Each formulation computes the same sums as the
textbook one, in another order, and skips only products with the zeros the
textbook inserts; results agree to float rounding.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax.numpy as jnp
from jax import lax

from convlib.ops.conv import input_gradient
from convlib.ops.geometry import Geometry
from convlib.ops.windows import full_rank


# --------------------------------------------------------------------------- input gradient by phases


@dataclasses.dataclass(frozen=True)
class _Phase:
    """One residue class `h = s q + t` of the input positions, along one spatial dim.

    The kernel taps that reach it are `k = first + j * step`, j < taps; output `i`
    meets `q` at `i = q + lo - j * dilation` (`lo` = the phase's own low padding);
    `size` positions `q` exist.
    """

    first: int
    step: int
    taps: int
    dilation: int
    lo: int
    size: int


def _phase(t: int, h: int, k: int, s: int, d: int, lo: int) -> _Phase:
    """The taps of phase `t`: those with `d k = t + lo (mod s)`, i.e. `s i + d k = s q + t + lo`."""
    size = max(-(-(h - t) // s), 0)
    step = s // math.gcd(s, d)
    first = next((k0 for k0 in range(min(step, k)) if (d * k0 - t - lo) % s == 0), None)
    if first is None:
        return _Phase(0, step, 0, 1, 0, size)
    taps = -(-(k - first) // step)
    return _Phase(first, step, taps, d // math.gcd(s, d), -((d * first - t - lo) // s), size)


def _sub_kernel(w, phases, geometry: Geometry):
    """The taps `W[first + j * step]` of one phase per spatial dim (a strided slice of the kernel)."""
    axes = range(geometry.ndim) if geometry.layout == "NHWC" else range(2, 2 + geometry.ndim)
    start, stride = [0] * w.ndim, [1] * w.ndim
    for axis, p in zip(axes, phases):
        start[axis], stride[axis] = p.first, p.step
    stop = list(w.shape)
    for axis, p in zip(axes, phases):
        stop[axis] = p.first + p.step * (p.taps - 1) + 1
    return lax.slice(w, start, stop, stride)


def input_gradient_by_phases(g, w, geometry: Geometry, in_spatial):
    """dE/dX without zero insertion: one stride-1 correlation per phase (sub-pixel decomposition).

    Split the input positions by their residue `t = h mod s` (per spatial dim;
    prod(s) phases). Position `h = s q + t` receives `G[i] W[k]` exactly when
    `s i + d k = s q + t + lo`, which fixes `d k mod s`:

        taps(t)    = {k : d k = t + lo (mod s)} = {first + j step},  step = s / gcd(s, d)
        dX_t[q]    = sum_j G[q - m_t - j d'] W[first + j step],      d' = d / gcd(s, d),
                                                                      m_t = (d first - t - lo) / s
                   = textbook dE/dX of a stride-1 conv with kernel W_t = W[first::step],
                     dilation d' and low padding -m_t, over the q < ceil((H - t) / s)
        dX[s q + t] = dX_t[q]                                         (interleave the phases)

    Each phase is :func:`convlib.ops.conv.input_gradient` (groups included); phases
    no tap reaches are zero. g: (N, *out, C_out) or channels first. Returns the input's shape.
    """
    n = geometry.ndim
    per_dim = [
        [_phase(t, h, k, s, d, lo) for t in range(s)]
        for h, k, s, d, (lo, _) in zip(in_spatial, geometry.kernel, geometry.stride, geometry.dilation, geometry.padding)
    ]
    blocks = [-(-h // s) for h, s in zip(in_spatial, geometry.stride)]
    parts = []
    for phases in itertools.product(*per_dim):
        sizes = tuple(p.size for p in phases)
        if any(p.taps == 0 for p in phases) or 0 in sizes:
            shape = full_rank(geometry, sizes, None)
            part = jnp.zeros([g.shape[a] if v is None else v for a, v in enumerate(shape)], g.dtype)
            part = part if geometry.layout == "NHWC" else part  # channel count fixed below
        else:
            sub = dataclasses.replace(
                geometry,
                kernel=tuple(p.taps for p in phases),
                stride=(1,) * n,
                dilation=tuple(p.dilation for p in phases),
                padding=tuple((p.lo, 0) for p in phases),
            )
            part = input_gradient(g, _sub_kernel(w, phases, geometry), sub, sizes)
        parts.append(part)
    return parts, blocks
