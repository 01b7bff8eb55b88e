"""Faster exact backward formulations of :func:`convlib.ops.conv`, and the static dispatch of `backward="custom"`.

Same notation as :mod:`convlib.ops.conv`: per spatial dim the input has size `H`, the kernel `K` taps with
dilation `d`, stride `s`, padding `(lo, hi)`, output `H_out`; `G = dE/dY`. Each formulation computes the
textbook sums in another order and skips only the products with the zeros the textbook inserts: results
agree with it to float rounding.

:func:`plan` picks, from static shapes only, what `backward="custom"` runs. On a CPU (measured with
experiments/benchmarks, XLA:CPU of JAX 0.10): depthwise convs tap by tap; 3-D convs as 2-D ones; other
grouped convs as one conv per group; then dX by phases when strided, else textbook; dW in batch chunks.
Other backends run the textbook formulation, which their conv libraries take natively.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from convlib.ops.conv import bias_gradient, full_correlation_padding, input_gradient, weight_gradient
from convlib.ops.geometry import Geometry
from convlib.ops.windows import full_rank, pad_spatial, scatter_back, window_offsets, window_view

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
    dims = zip(in_spatial, geometry.kernel, geometry.stride, geometry.dilation, geometry.padding)
    per_dim = [[_phase(t, h, k, s, d, lo) for t in range(s)] for h, k, s, d, (lo, _) in dims]
    dx = jnp.zeros(_input_shape(g, w, geometry, in_spatial), g.dtype)
    # phase t's dX_t[q] goes to s q + t: window offset t of the stride-s geometry without dilation or padding
    unpadded = dataclasses.replace(geometry, dilation=(1,) * geometry.ndim, padding=((0, 0),) * geometry.ndim)
    for t, phases in zip(itertools.product(*map(range, geometry.stride)), itertools.product(*per_dim)):
        if all(p.taps and p.size for p in phases):
            dx = dx + scatter_back(_phase_gradient(g, w, geometry, phases), t, unpadded, in_spatial)
    return dx


def _input_shape(g, w, geometry: Geometry, in_spatial) -> tuple[int, ...]:
    """(N, *in_spatial, C_in) or (N, C_in, *in_spatial)."""
    c_in = geometry.groups * w.shape[geometry.ndim if geometry.layout == "NHWC" else 1]
    spatial = tuple(in_spatial)
    return (g.shape[0], *spatial, c_in) if geometry.layout == "NHWC" else (g.shape[0], c_in, *spatial)


def _phase_gradient(g, w, geometry: Geometry, phases):
    """dX_t: the textbook input gradient of the stride-1 conv with the phase's sub-kernel."""
    sub = dataclasses.replace(
        geometry,
        kernel=tuple(p.taps for p in phases),
        stride=(1,) * geometry.ndim,
        dilation=tuple(p.dilation for p in phases),
        padding=tuple((p.lo, 0) for p in phases),
    )
    return input_gradient(g, _sub_kernel(w, phases, geometry), sub, tuple(p.size for p in phases))


# --------------------------------------------------------------------------- weight gradient by batch chunks


def weight_gradient_by_chunks(x, g, geometry: Geometry, kernel_shape, chunk: int):
    """dE/dW as a sum over batch chunks of the textbook correlation.

    dE/dW sums over the batch, so it splits into chunks of `chunk` images:

        dE/dW = sum_b X_b (*) G_b        X_b, G_b: images [b chunk, (b + 1) chunk) of X and G

    each term :func:`convlib.ops.conv.weight_gradient`. A chunk's operands stay in
    cache, and the chunks can run concurrently. Returns the kernel's shape.
    """
    return sum(
        weight_gradient(x[start : start + chunk], g[start : start + chunk], geometry, kernel_shape)
        for start in range(0, x.shape[0], chunk)
    )


# --------------------------------------------------------------------------- depthwise convs by taps


def depthwise_weight_gradient(x, g, geometry: Geometry, kernel_shape):
    """dE/dW of a depthwise conv (groups = C_in; m = C_out / C_in filters per input channel), tap by tap:

        dE/dW[k, 0, c m + j] = sum_{n, i} X_pad[n, s i + d k, c] G[n, i, c m + j]

    each tap the input's shifted view times G, summed over batch and space: loop fusions instead of
    XLA:CPU's slow `batch_group_count` conv. Returns the kernel's shape.
    """
    multiplier = g.shape[geometry.channel_axis] // geometry.groups
    x_pad = jnp.repeat(pad_spatial(x, geometry), multiplier, axis=geometry.channel_axis)
    out_spatial = geometry.spatial_shape(g.shape)
    batch_and_space = tuple(a for a in range(g.ndim) if a != geometry.channel_axis)
    taps = jnp.stack(
        [
            jnp.sum(window_view(x_pad, k, geometry, out_spatial) * g, axis=batch_and_space)
            for k in window_offsets(geometry)
        ]
    )  # (prod K, C_out)
    return taps.reshape(kernel_shape) if geometry.layout == "NHWC" else taps.T.reshape(kernel_shape)


def depthwise_input_gradient(g, w, geometry: Geometry, in_spatial):
    """dE/dX of a depthwise conv, tap by tap (G_full: G dilated by s and padded as for the textbook dE/dX):

        dE/dX[n, h, c] = sum_j sum_k G_full[n, h + d k, c m + j] W[K - 1 - k, 0, c m + j]

    the shifted views of G_full scaled per channel and added (one loop fusion), then the m filters of each
    input channel summed. Returns the input's shape.
    """
    pads = full_correlation_padding(geometry, in_spatial, geometry.spatial_shape(g.shape))
    pads = [(lo, hi, s - 1) for (lo, hi), s in zip(pads, geometry.stride)]
    g_full = lax.pad(g, jnp.zeros((), g.dtype), full_rank(geometry, pads, (0, 0, 0)))
    unit_stride = dataclasses.replace(geometry, stride=(1,) * geometry.ndim)
    per_channel = tuple(-1 if a == geometry.channel_axis else 1 for a in range(g.ndim))
    dx = sum(
        window_view(g_full, k, unit_stride, in_spatial) * _flipped_tap(w, k, geometry).reshape(per_channel)
        for k in window_offsets(geometry)
    )
    axis, c_in = geometry.channel_axis, geometry.groups
    return dx.reshape(*dx.shape[:axis], c_in, -1, *dx.shape[axis + 1 :]).sum(axis + 1)


def _flipped_tap(w, k, geometry: Geometry):
    """The weights (C_out,) of tap `K - 1 - k` of a depthwise kernel (*K, 1, C_out) or (C_out, 1, *K)."""
    k = tuple(size - 1 - i for size, i in zip(geometry.kernel, k))
    return w[(*k, 0)] if geometry.layout == "NHWC" else w[(slice(None), 0, *k)]


# --------------------------------------------------------------------------- lowerings


def _channel_blocks(a, axis: int, groups: int) -> list:
    size = a.shape[axis] // groups
    return [lax.slice_in_dim(a, i * size, (i + 1) * size, axis=axis) for i in range(groups)]


def _kernel_out_axis(geometry: Geometry) -> int:
    return geometry.ndim + 1 if geometry.layout == "NHWC" else 0


def gradients_per_group(geometry: Geometry, x, w, g, inner: Plan | None = None):
    """(dE/dX, dE/dW) of a grouped conv as `groups` independent convs, each planned on its own.

        X = [X_1 .. X_g], G = [G_1 .. G_g], W = [W_1 .. W_g]   (channel blocks; W split on C_out)
        dE/dX = [dE/dX_1 .. dE/dX_g],  dE/dW = [dE/dW_1 .. dE/dW_g]   of the conv Y_j = X_j (*) W_j

    `inner`: the plan of every group's conv (None: planned here).
    """
    one = dataclasses.replace(geometry, groups=1)
    blocks = zip(
        *(
            _channel_blocks(a, axis, geometry.groups)
            for a, axis in ((x, geometry.channel_axis), (w, _kernel_out_axis(geometry)), (g, geometry.channel_axis))
        )
    )
    dxs, dws = zip(*(gradients(one, xj, wj, gj, inner) for xj, wj, gj in blocks))
    return (jnp.concatenate(dxs, axis=geometry.channel_axis), jnp.concatenate(dws, axis=_kernel_out_axis(geometry)))


def gradients_by_depth_taps(geometry: Geometry, x, w, g, inner: Plan | None = None):
    """(dE/dX, dE/dW) of a 3-D conv as one 2-D conv per depth tap `k`, depth folded into the batch:

        X_k[(n, j)] = X_pad[n, s j + d k]                  (N * D_out, H, W, C): the depth slice tap k reads
        Y = sum_k X_k (*) W[k]                             2-D convs, G as (N * D_out, H_out, W_out, C_out)
        dE/dW[k] = dE/dW of the k-th 2-D conv
        dE/dX[n, s j + d k - lo] += dE/dX_k[(n, j)]        (a strided pad along depth, crops the padding)

    `inner`: the plan of the 2-D convs (None: planned here). Channels-first arrays alike.
    """
    depth, n_out = geometry.spatial_axes[0], g.shape[geometry.spatial_axes[0]]
    (lo, hi), s, d, size = geometry.padding[0], geometry.stride[0], geometry.dilation[0], x.shape[depth]
    flat = _without_depth(geometry)
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), [(lo, hi, 0) if a == depth else (0, 0, 0) for a in range(x.ndim)])
    taps_axis = 0 if geometry.layout == "NHWC" else 2
    dx, dws = jnp.zeros_like(x), []
    for k in range(geometry.kernel[0]):
        x_k = lax.slice_in_dim(x_pad, d * k, d * k + s * (n_out - 1) + 1, s, axis=depth)
        dx_k, dw_k = gradients(
            flat,
            _fold_depth(x_k, depth),
            lax.index_in_dim(w, k, taps_axis, keepdims=False),
            _fold_depth(g, depth),
            inner,
        )
        dws.append(dw_k)
        unfolded = jnp.moveaxis(dx_k.reshape(x.shape[0], n_out, *dx_k.shape[1:]), 1, depth)
        config = [
            (d * k - lo, size + lo - d * k - s * (n_out - 1) - 1, s - 1) if a == depth else (0, 0, 0)
            for a in range(x.ndim)
        ]
        dx = dx + lax.pad(unfolded, jnp.zeros((), x.dtype), config)
    return dx, jnp.stack(dws, axis=taps_axis)


def _without_depth(geometry: Geometry) -> Geometry:
    """A 3-D geometry's last two spatial dims."""
    return dataclasses.replace(
        geometry,
        kernel=geometry.kernel[1:],
        stride=geometry.stride[1:],
        padding=geometry.padding[1:],
        dilation=geometry.dilation[1:],
    )


def _fold_depth(a, depth: int):
    """(N, D, ...) or (N, C, D, ...) -> (N * D, ...) / (N * D, C, ...): depth joins the batch."""
    a = jnp.moveaxis(a, depth, 1)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


# --------------------------------------------------------------------------- dispatch

CHUNK = 8  # fewest images per weight-gradient chunk
CHUNK_PIXELS = 1024  # output pixels a weight-gradient chunk aims at (small maps take more images)

MAX_PLANNED_GROUPS = 4  # more groups: textbook per group, a bounded op count

INPUT_GRADIENTS = {"textbook": input_gradient, "phases": input_gradient_by_phases, "taps": depthwise_input_gradient}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `backward="custom"` runs for one conv: a lowering ("none", "depth taps", "per group")
    whose convs follow the plan `inner`; or, without one, the dX formulation (a key of `INPUT_GRADIENTS`) and
    the dW one ("textbook", "chunks" of `chunk` images, or "taps" for depthwise convs)."""

    lowering: str = "none"
    input_gradient: str = "textbook"
    weight_gradient: str = "textbook"
    chunk: int = 0
    inner: Plan | None = None

    def __str__(self) -> str:
        if self.inner is not None:
            return f"{self.lowering}: {self.inner}"
        dw = f"chunks of {self.chunk}" if self.weight_gradient == "chunks" else self.weight_gradient
        return f"dX {self.input_gradient}, dW {dw}"


def plan(geometry: Geometry, x_shape, w_shape, backend: str | None = None) -> Plan:
    """The formulations `backward="custom"` uses for these static shapes (`backend`: default JAX backend).

    Rules measured on XLA:CPU, which runs a 2-D conv with more than 16 channels on either side in its fast
    conv library (YNNPACK) and every other conv in a slower generic one:
    - 3-D: one 2-D conv per depth tap, depth folded into the batch;
    - depthwise (groups = C_in = C_out): dX and dW tap by tap, elementwise (XLA:CPU's depthwise convs run
      at ~1 GFLOP/s; with a channel multiplier, one conv per group measured faster);
    - other groups: one conv per group, since grouped convs never reach that library (each planned as
      below for up to `MAX_PLANNED_GROUPS` groups, else textbook);
    - dX: by phases when strided (no zero insertion), else textbook;
    - dW: in batch chunks when there are at least two (1-D or 2-D): each chunk's operands stay in
      cache and the chunks run concurrently; else textbook. A chunk holds `CHUNK` images, or on maps of
      fewer than `CHUNK_PIXELS / CHUNK` output pixels the power of two nearest below `CHUNK_PIXELS` pixels
      (VGG's 4x4 512-channel dW: 8 images 63 GFLOP/s, 64 images 164, textbook 124).
    """
    if (backend or jax.default_backend()) != "cpu":
        return Plan()
    n, layout, groups = geometry.ndim, geometry.layout, geometry.groups
    c_in, c_out = x_shape[geometry.channel_axis], w_shape[_kernel_out_axis(geometry)]
    if 1 < groups == c_in == c_out:
        return Plan(input_gradient="taps", weight_gradient="taps")
    if n == 3:
        flat = _without_depth(geometry)
        depth, taps = geometry.spatial_axes[0], 0 if layout == "NHWC" else 2
        n_out = geometry.output_spatial(geometry.spatial_shape(x_shape))[0]
        folded = list(x_shape)
        del folded[depth]
        folded[0] *= n_out
        inner = plan(flat, tuple(folded), (*w_shape[:taps], *w_shape[taps + 1 :]), "cpu")
        return Plan("depth taps", inner=inner)
    if groups > 1:
        one = dataclasses.replace(geometry, groups=1)
        group_x = _with_channels(x_shape, geometry.channel_axis, c_in // groups)
        group_w = _with_channels(w_shape, _kernel_out_axis(geometry), c_out // groups)
        inner = plan(one, group_x, group_w, "cpu") if groups <= MAX_PLANNED_GROUPS else Plan()
        return Plan("per group", inner=inner)
    dx = "phases" if any(s > 1 for s in geometry.stride) else "textbook"
    chunk = _weight_gradient_chunk(x_shape[0], math.prod(geometry.output_spatial(geometry.spatial_shape(x_shape))))
    if chunk:
        return Plan(input_gradient=dx, weight_gradient="chunks", chunk=chunk)
    return Plan(input_gradient=dx)


def _weight_gradient_chunk(batch: int, out_pixels: int) -> int:
    """Images per dW chunk, or 0 when fewer than two chunks of `CHUNK` images fit in the batch."""
    chunk = min(max(CHUNK, _power_of_two_below(CHUNK_PIXELS // max(out_pixels, 1))), _power_of_two_below(batch // 2))
    return chunk if chunk >= CHUNK else 0


def _power_of_two_below(n: int) -> int:
    """The largest power of two <= n (0 for n < 1)."""
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _with_channels(shape, axis: int, channels: int) -> tuple:
    return (*shape[:axis], channels, *shape[axis + 1 :])


def gradients(geometry: Geometry, x, w, g, p: Plan | None = None):
    """(dE/dX, dE/dW) of `conv` by the formulations of plan `p` (None: :func:`plan`'s for these shapes)."""
    if g.size == 0 or x.size == 0:  # nothing flows back (a conv with an empty output does not lower)
        return jnp.zeros_like(x), jnp.zeros(w.shape, jnp.result_type(x, g))
    p = p or plan(geometry, x.shape, w.shape)
    if p.lowering == "per group":
        return gradients_per_group(geometry, x, w, g, p.inner)
    if p.lowering == "depth taps":
        return gradients_by_depth_taps(geometry, x, w, g, p.inner)
    dx = INPUT_GRADIENTS[p.input_gradient](g, w, geometry, geometry.spatial_shape(x.shape))
    if p.weight_gradient == "chunks":
        return dx, weight_gradient_by_chunks(x, g, geometry, w.shape, p.chunk)
    if p.weight_gradient == "taps":
        return dx, depthwise_weight_gradient(x, g, geometry, w.shape)
    return dx, weight_gradient(x, g, geometry, w.shape)


def backward(geometry: Geometry, residuals, g):
    """(dE/dX, dE/dW, dE/db) of `conv(x, w, b)` for the custom VJP; residuals (x, w, b or None)."""
    x, w, b = residuals
    dx, dw = gradients(geometry, x, w, g)
    return dx, dw, None if b is None else bias_gradient(g, geometry).astype(g.dtype)
