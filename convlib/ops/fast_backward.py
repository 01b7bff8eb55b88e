"""Faster exact backward formulations of :func:`convlib.ops.conv`, and the lowerings that split a conv into
smaller ones.

Same notation as :mod:`convlib.ops.textbook`: per spatial dim the input has size `H`, the kernel `K` taps with
dilation `d`, stride `s`, padding `(lo, hi)`, output `H_out`; `G = dE/dY`. Each formulation computes the textbook
sums in another order and skips only the products with the zeros the textbook inserts: results agree with it to
float rounding. Which one runs where is :mod:`convlib.ops.plan`'s business, not this module's: here are only the
timeless maths.

- dX: :func:`input_gradient_by_phases` (no zero insertion), :func:`depthwise_input_gradient` (tap by tap),
  :func:`input_gradient_with_padded_channels` (the textbook conv with zero filters up to a multiple of channels),
  :func:`input_gradient_by_folded_columns` (the kernel's columns folded into its channels);
- dW: :func:`weight_gradient_by_chunks` (batch chunks), :func:`depthwise_weight_gradient` (tap by tap),
  :func:`weight_gradient_by_space_to_depth` (the weight gradient of the space-to-depth forward's blocked conv);
- lowerings (:class:`Lowering`): :data:`PER_GROUP` (a grouped conv as independent convs), :data:`DEPTH_TAPS`
  (a 3-D conv as 2-D convs, one per depth tap).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jax import lax

from convlib.ops.fast_forward import block_kernel, input_in_blocks
from convlib.ops.formulation import GradientsFormula
from convlib.ops.geometry import Geometry, make_geometry
from convlib.ops.textbook import full_correlation_padding, input_gradient, weight_gradient
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
    axes = geometry.axes.kernel_spatial
    start, stride = [0] * w.ndim, [1] * w.ndim
    for axis, p in zip(axes, phases):
        start[axis], stride[axis] = p.first, p.step
    stop = list(w.shape)
    for axis, p in zip(axes, phases):
        stop[axis] = p.first + p.step * (p.taps - 1) + 1
    return lax.slice(w, start, stop, stride)


def input_gradient_by_phases(geometry: Geometry, g, w, in_spatial):
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

    Each phase is :func:`convlib.ops.textbook.input_gradient` (groups included); phases
    no tap reaches are zero. g: (N, *out, C_out) or channels first. Returns the input's shape.
    """
    dims = zip(in_spatial, geometry.kernel, geometry.stride, geometry.dilation, geometry.padding)
    per_dim = [[_phase(t, h, k, s, d, lo) for t in range(s)] for h, k, s, d, (lo, _) in dims]
    dx = jnp.zeros(geometry.input_shape(g.shape, w.shape, in_spatial), g.dtype)
    # phase t's dX_t[q] goes to s q + t: window offset t of the stride-s geometry without dilation or padding
    unpadded = dataclasses.replace(geometry, dilation=(1,) * geometry.ndim, padding=((0, 0),) * geometry.ndim)
    for t, phases in zip(itertools.product(*map(range, geometry.stride)), itertools.product(*per_dim)):
        if all(p.taps and p.size for p in phases):
            dx = dx + scatter_back(_phase_gradient(g, w, geometry, phases), t, unpadded, in_spatial)
    return dx


def _phase_gradient(g, w, geometry: Geometry, phases):
    """dX_t: the textbook input gradient of the stride-1 conv with the phase's sub-kernel."""
    sub = dataclasses.replace(
        geometry,
        kernel=tuple(p.taps for p in phases),
        stride=(1,) * geometry.ndim,
        dilation=tuple(p.dilation for p in phases),
        padding=tuple((p.lo, 0) for p in phases),
    )
    return input_gradient(sub, g, _sub_kernel(w, phases, geometry), tuple(p.size for p in phases))


# --------------------------------------------------------------------------- input gradient by folded columns


def input_gradient_by_folded_columns(geometry: Geometry, g, w, in_spatial):
    """dE/dX with the kernel's last spatial dim (its columns) folded into its input channels: one correlation with
    K times the output channels, then K shifted adds.

    Split the textbook sum by the column tap `b` (K taps, dilation `d`, stride `s`, low padding `lo` along the last
    spatial dim; rows stand for all the other spatial dims):

        dX[.., y, x, i] = sum_b Z[.., y, q, (b, i)]      over the columns q with s q + d b - lo = x
        Z[.., y, q, (b, i)] = sum_{a, o} G[.., y - a, q, o] W[a, b, i, o]

    Z is the textbook dE/dX of a one-column conv (the rows' geometry, kernel `W'[a, 0, (b, i), o] = W[a, b, i, o]`,
    K C_in input channels) over the output's columns: one wide correlation instead of one with C_in outputs, which
    XLA:CPU runs slowly when C_in is small. Ungrouped convs only. Returns the input's shape.
    """
    axes, n = geometry.axes, geometry.ndim
    column, c_in = axes.kernel_spatial[-1], w.shape[axes.kernel_in]
    taps = w.shape[column]
    # W': the column axis moved to just before C_in and merged with it into (b, i), a 1-tap column axis in its place
    before_in = axes.kernel_in - (column < axes.kernel_in)
    folded = jnp.moveaxis(w, column, before_in)
    folded = folded.reshape(*folded.shape[:before_in], taps * c_in, *folded.shape[before_in + 2 :])
    folded = jnp.expand_dims(folded, column)
    one_column = dataclasses.replace(
        geometry,
        kernel=(*geometry.kernel[:-1], 1),
        stride=(*geometry.stride[:-1], 1),
        dilation=(*geometry.dilation[:-1], 1),
        padding=(*geometry.padding[:-1], (0, 0)),
    )
    out_columns = geometry.spatial_shape(g.shape)[-1]
    z = input_gradient(one_column, g, folded, (*in_spatial[:-1], out_columns))
    # column tap b of Z lands at s q + d b - lo: window offset b of the columns' own geometry
    columns = dataclasses.replace(
        geometry,
        stride=(*(1,) * (n - 1), geometry.stride[-1]),
        dilation=(*(1,) * (n - 1), geometry.dilation[-1]),
        padding=(*((0, 0),) * (n - 1), geometry.padding[-1]),
    )
    channel = axes.channel
    return sum(
        scatter_back(
            lax.slice_in_dim(z, b * c_in, (b + 1) * c_in, axis=channel), (*(0,) * (n - 1), b), columns, in_spatial
        )
        for b in range(taps)
    )


# --------------------------------------------------------------------------- input gradient with padded channels


def input_gradient_with_padded_channels(geometry: Geometry, g, w, in_spatial, *, multiple: int):
    """dE/dX by the textbook correlation with the kernel's C_in axis (dX's output channels) padded with zero
    filters to a multiple of `multiple`, then sliced back: the extra channels are sums of products with zero, the
    real ones the textbook sums in the textbook order. Ungrouped convs only.
    """
    axis, c_in = geometry.axes.kernel_in, w.shape[geometry.axes.kernel_in]
    widths = [(0, 0)] * w.ndim
    widths[axis] = (0, -c_in % multiple)
    dx = input_gradient(geometry, g, jnp.pad(w, widths), in_spatial)
    return lax.slice_in_dim(dx, 0, c_in, axis=geometry.axes.channel)


# --------------------------------------------------------------------------- weight gradient by batch chunks


def weight_gradient_by_chunks(geometry: Geometry, x, g, kernel_shape, *, chunk: int):
    """dE/dW as a sum over batch chunks of the textbook correlation.

    dE/dW sums over the batch, so it splits into chunks of `chunk` images:

        dE/dW = sum_b X_b (*) G_b        X_b, G_b: images [b chunk, (b + 1) chunk) of X and G

    each term :func:`convlib.ops.textbook.weight_gradient`. A chunk's operands stay in
    cache, and the chunks can run concurrently. Returns the kernel's shape.
    """
    return sum(
        weight_gradient(geometry, x[start : start + chunk], g[start : start + chunk], kernel_shape)
        for start in range(0, x.shape[0], chunk)
    )


# --------------------------------------------------------------------------- weight gradient by space-to-depth


def weight_gradient_by_space_to_depth(geometry: Geometry, x, g, kernel_shape, *, block: int, chunk: int):
    """dE/dW of a 2-D, stride-1, undilated, ungrouped NHWC conv as the weight gradient of its space-to-depth form
    (:mod:`convlib.ops.fast_forward`: `Xs`, the input in `block` x `block` blocks; `Gs`, G padded with zeros to
    whole blocks and cut alike, output phase (a, b) as channels), folded back onto the kernel's taps:

        dE/dWs[p, q, (u, v, c), (a, b, o)] = sum_{n, i, j} Xs[n, i + p, j + q, (u, v, c)] Gs[n, i, j, (a, b, o)]
        dE/dW[k_h, k_w, c, o] = sum_{a, b} dE/dWs[p, q, (u, v, c), (a, b, o)]   at B p + u - a = k_h, B q + v - b = k_w

    Each textbook product X[n, y + k_h, x + k_w, c] G[n, y, x, o] appears once (output pixel (y, x) = (B i + a,
    B j + b) meets input row B (i + p) + u); the others are products with G's zero padding, and the entries of
    taps outside the kernel are dropped, not added. The blocked correlation runs in batch chunks of `chunk`
    images (:func:`weight_gradient_by_chunks`). Returns the kernel's shape.
    """
    k_h, k_w, c, c_out = kernel_shape
    kernel = block_kernel(geometry.kernel, block)
    # Gs: G cut like the input of an unpadded 1x1 conv, which is G with zeros up to whole blocks
    gs = input_in_blocks(g, make_geometry(2, 1), block)
    blocked_shape = (*kernel, block * block * c, block * block * c_out)
    dws = weight_gradient_by_chunks(
        make_geometry(2, kernel), input_in_blocks(x, geometry, block), gs, blocked_shape, chunk=chunk
    )
    # (p, q, u, v, c, a, b, o) -> (a, b, B p + u, B q + v, c, o): phase (a, b)'s kernel, tap B p + u - a at row B p + u
    phases = dws.reshape(*kernel, block, block, c, block, block, c_out).transpose(5, 6, 0, 2, 1, 3, 4, 7)
    phases = phases.reshape(block, block, block * kernel[0], block * kernel[1], c, c_out)
    return sum(phases[a, b, a : a + k_h, b : b + k_w] for a in range(block) for b in range(block))


# --------------------------------------------------------------------------- depthwise convs by taps


def depthwise_weight_gradient(geometry: Geometry, x, g, kernel_shape):
    """dE/dW of a depthwise conv (groups = C_in; m = C_out / C_in filters per input channel), tap by tap:

        dE/dW[k, 0, c m + j] = sum_{n, i} X_pad[n, s i + d k, c] G[n, i, c m + j]

    each tap the input's shifted view times G, summed over batch and space: loop fusions instead of
    XLA:CPU's slow `batch_group_count` conv. Returns the kernel's shape.
    """
    multiplier = g.shape[geometry.channel_axis] // geometry.groups
    x_pad = jnp.repeat(pad_spatial(x, geometry), multiplier, axis=geometry.channel_axis)
    out_spatial = geometry.spatial_shape(g.shape)
    batch_and_space = tuple(a for a in range(g.ndim) if a != geometry.channel_axis)
    taps = [
        jnp.sum(window_view(x_pad, k, geometry, out_spatial) * g, axis=batch_and_space)
        for k in window_offsets(geometry)
    ]
    axes = geometry.axes  # (*K, 1, C_out) in order, then each to its kernel axis
    taps = jnp.stack(taps).reshape(*geometry.kernel, 1, -1)
    return jnp.moveaxis(taps, range(taps.ndim), (*axes.kernel_spatial, axes.kernel_in, axes.kernel_out))


def depthwise_input_gradient(geometry: Geometry, g, w, in_spatial):
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
    index = [0] * w.ndim
    index[geometry.axes.kernel_out] = slice(None)
    for axis, size, i in zip(geometry.axes.kernel_spatial, geometry.kernel, k):
        index[axis] = size - 1 - i
    return w[tuple(index)]


# --------------------------------------------------------------------------- lowerings

Operands = tuple  # (x, w, g) of one conv


@dataclasses.dataclass(frozen=True)
class Lowering:
    """A conv written as several smaller convs of one geometry: their operands cut from the conv's, their
    gradients put back together.

    name: what it is called in a plan; sub_geometry: the smaller convs' geometry; split: `(geometry, x, w, g) ->
    [(x_i, w_i, g_i), ...]`; merge: `(geometry, x, w, [(dx_i, dw_i), ...]) -> (dE/dX, dE/dW)`.
    """

    name: str
    sub_geometry: Callable[[Geometry], Geometry]
    split: Callable[..., Sequence[Operands]]
    merge: Callable[..., tuple]

    def __call__(self, geometry: Geometry, x, w, g, inner: GradientsFormula):
        """(dE/dX, dE/dW), each smaller conv's gradients by `inner(sub_geometry, x_i, w_i, g_i)`."""
        sub = self.sub_geometry(geometry)
        return self.merge(geometry, x, w, [inner(sub, *operands) for operands in self.split(geometry, x, w, g)])


def _channel_blocks(a, axis: int, groups: int) -> list:
    size = a.shape[axis] // groups
    return [lax.slice_in_dim(a, i * size, (i + 1) * size, axis=axis) for i in range(groups)]


def _split_groups(geometry: Geometry, x, w, g) -> list[Operands]:
    """X = [X_1 .. X_g], W = [W_1 .. W_g] (split on C_out), G = [G_1 .. G_g]: channel blocks."""
    axes, groups = geometry.axes, geometry.groups
    blocks = (
        _channel_blocks(a, axis, groups) for a, axis in ((x, axes.channel), (w, axes.kernel_out), (g, axes.channel))
    )
    return list(zip(*blocks))


def _merge_groups(geometry: Geometry, x, w, parts) -> tuple:
    """dE/dX = [dE/dX_1 .. dE/dX_g], dE/dW = [dE/dW_1 .. dE/dW_g]."""
    dxs, dws = zip(*parts)
    return jnp.concatenate(dxs, axis=geometry.axes.channel), jnp.concatenate(dws, axis=geometry.axes.kernel_out)


PER_GROUP = Lowering(
    "per group", lambda geometry: dataclasses.replace(geometry, groups=1), _split_groups, _merge_groups
)
"""A grouped conv as `groups` independent convs Y_j = X_j (*) W_j, on channel blocks."""


def _depth_only(geometry: Geometry) -> Geometry:
    """A 3-D geometry's depth dim alone (height and width: one tap, stride 1, no padding)."""
    return dataclasses.replace(
        geometry,
        kernel=(geometry.kernel[0], 1, 1),
        stride=(geometry.stride[0], 1, 1),
        padding=(geometry.padding[0], (0, 0), (0, 0)),
        dilation=(geometry.dilation[0], 1, 1),
    )


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


def _split_depth_taps(geometry: Geometry, x, w, g) -> list[Operands]:
    """X_k[(n, j)] = X_pad[n, s j + d k] (the depth slice tap k reads: a window view along depth), W[k] the
    kernel's depth tap k, G with depth folded into the batch."""
    depth, taps_axis = geometry.spatial_axes[0], geometry.axes.kernel_spatial[0]
    along_depth = _depth_only(geometry)
    x_pad, out_spatial = pad_spatial(x, along_depth), (g.shape[depth], *geometry.spatial_shape(x.shape)[1:])
    g_folded = _fold_depth(g, depth)
    return [
        (
            _fold_depth(window_view(x_pad, (k, 0, 0), along_depth, out_spatial), depth),
            lax.index_in_dim(w, k, taps_axis, keepdims=False),
            g_folded,
        )
        for k in range(geometry.kernel[0])
    ]


def _merge_depth_taps(geometry: Geometry, x, w, parts) -> tuple:
    """dE/dW[k] = dE/dW of the k-th 2-D conv; dE/dX[n, s j + d k - lo] += dE/dX_k[(n, j)] (the adjoint of the
    window view: `scatter_back` along depth, cropping the padding)."""
    depth, along_depth = geometry.spatial_axes[0], _depth_only(geometry)
    dx = jnp.zeros_like(x)
    for k, (dx_k, _) in enumerate(parts):
        unfolded = jnp.moveaxis(dx_k.reshape(x.shape[0], -1, *dx_k.shape[1:]), 1, depth)
        dx = dx + scatter_back(unfolded, (k, 0, 0), along_depth, geometry.spatial_shape(x.shape))
    return dx, jnp.stack([dw_k for _, dw_k in parts], axis=geometry.axes.kernel_spatial[0])


DEPTH_TAPS = Lowering("depth taps", _without_depth, _split_depth_taps, _merge_depth_taps)
"""A 3-D conv as one 2-D conv per depth tap k, depth folded into the batch: Y = sum_k X_k (*) W[k]."""
