"""Max and average pooling with hand-derived backward passes.

With window `K`, stride `s` and padding `(lo, hi)` per spatial dim, output `i`
reads the padded input at `s i + k` for the window offsets `k`. The backward
scatters each output's cotangent `G[i]` back to those positions, one window
offset at a time (a strided `lax.pad` per offset), and crops the padding; windows that tile the input
(stride = window) need no scatter: the input is cut into its tiles by a reshape, and the tiles' gradients are put
back by one (max: with a short minor axis, each tile's first maximum by one reduction; avg: a repeat of each
spatial dim):

    max:  dE/dX[s i + k] += G[i]          for the FIRST k (row-major) where X[s i + k] == Y[i]
    avg:  dE/dX[s i + k] += G[i] / D[i]   for every k, D = the divisor of the forward

Overlapping windows accumulate. Max-pool ties go to the first maximum in
row-major window order (PyTorch's and XLA's rule). A window holding NaN
outputs NaN (as in PyTorch) and its gradient goes to the first NaN.

Pooling has one hand-derived backward, so `backward="custom"` and `backward="textbook"` both name it (a model
built with either runs the same pools); "autodiff" differentiates the `lax.reduce_window` forward instead;
"composable" registers the same backward as the transpose of a linear primitive (avg pool itself; max pool's JVP,
the tangent at the first maximum of each window), so that every JAX transformation composes with it
(:mod:`convlib.ops.composable`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from convlib.ops import composable
from convlib.ops.checks import check_bool
from convlib.ops.geometry import (
    Geometry,
    Padding,
    Size,
    as_float_array,
    ceil_mode_padding,
    check_backward,
    check_layout,
    input_spatial_ndim,
    layout_axes,
    make_geometry,
)
from convlib.ops.sharding import sum_to_primal_axes
from convlib.ops.windows import full_rank, pad_spatial, scatter_back, window_offsets, window_view


def pool_geometry(x, window, stride=None, padding=0, *, ceil_mode=False, layout="NHWC") -> Geometry:
    """Validates pooling arguments; returns the :class:`Geometry` (ceil mode folded into the padding)."""
    layout, ndim = check_layout(layout), input_spatial_ndim(x)
    ceil_mode = check_bool("ceil_mode", ceil_mode)
    in_spatial = tuple(x.shape[a] for a in layout_axes(layout, ndim).spatial)
    geometry = make_geometry(
        ndim,
        window,
        stride=window if stride is None else stride,
        padding=padding,
        layout=layout,
        in_spatial=in_spatial,
    )
    check_pool_padding(geometry, padding)
    if ceil_mode:
        pads = ceil_mode_padding(in_spatial, geometry.padding, geometry.kernel, geometry.stride)
        geometry = dataclasses.replace(geometry, padding=pads)
    return geometry


def check_pool_padding(geometry: Geometry, padding) -> None:
    """Raises ValueError unless every side's padding lies between 0 and half the window (PyTorch's rule: a window
    must always hold an input element)."""
    for (lo, hi), k in zip(geometry.padding, geometry.kernel):
        if not 0 <= lo <= k // 2 or not 0 <= hi <= k // 2:
            raise ValueError(f"padding must be between 0 and half the window {geometry.kernel}, got {padding!r}")


def _reduce(x, init, op, geometry: Geometry):
    return lax.reduce_window(
        x,
        init,
        op,
        window_dimensions=full_rank(geometry, geometry.kernel, 1),
        window_strides=full_rank(geometry, geometry.stride, 1),
        padding=full_rank(geometry, geometry.padding, (0, 0)),
    )


# --------------------------------------------------------------------------- max pool


def _max_forward(x, geometry: Geometry):
    return _reduce(x, -jnp.inf, lax.max, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _custom_max_pool(x, geometry: Geometry):
    return _max_forward(x, geometry)


def _custom_max_pool_fwd(x, geometry):
    y = _max_forward(x, geometry)
    return y, (x, y)


def _custom_max_pool_bwd(geometry, residuals, g):
    """Routes each output's cotangent to the first maximum of its window."""
    x, y = residuals
    dx = jnp.zeros_like(x)
    if y.size == 0:
        return (dx,)
    with jax.named_scope("convlib.max_pool.dX"):
        return (sum_to_primal_axes(_first_maximum_gradient(x, y, g, geometry), x),)


# The tiled backward by one reduction (:func:`_first_maximum_in_tiles`) measured faster where the array's minor axis
# is short, slower where it fills the CPU's vectors (2-core Intel Xeon, ReLU + 2x2 max pool, fwd + bwd, interleaved):
# 256x28x28x6 2.69 -> 1.55 ms (LeNet-5's training step 9.47 -> 8.38 ms), but 128x28x28x16 1.31 -> 1.61 ms and
# 256x10x10x16 0.51 -> 0.60 ms (the main job, pooling 16 channels, trained 6 % slower with it).
SHORT_MINOR_AXIS = 8


def _first_maximum_gradient(x, y, g, geometry: Geometry):
    """dE/dX[s i + k] += G[i] at the first offset k (row-major) where the window's value is Y[i] (or both NaN).

    Windows that tile the input (stride = window) are cut out of it by a reshape: with a minor axis shorter than
    `SHORT_MINOR_AXIS`, each tile's first maximum is found by one reduction (:func:`_first_maximum_in_tiles`); else
    offset by offset, and the gradients put back by one reshape (each input then takes at most one cotangent).
    Overlapping windows scatter back offset by offset."""
    x_padded = pad_spatial(x, geometry, -jnp.inf)
    in_spatial = geometry.spatial_shape(x.shape)
    out_spatial = geometry.spatial_shape(y.shape)
    tiles = geometry.stride == geometry.kernel
    if tiles and x.shape[-1] < SHORT_MINOR_AXIS:
        return _first_maximum_in_tiles(x_padded, y, g, geometry, in_spatial)
    if tiles:
        x_padded = _as_tiles(x_padded, geometry, out_spatial)
    taken = jnp.zeros(y.shape, bool)
    gradients = []
    for offset in window_offsets(geometry):
        view = _tile_view(x_padded, offset, geometry) if tiles else window_view(x_padded, offset, geometry, out_spatial)
        hit = _is_maximum(view, y) & ~taken
        taken = taken | hit
        gradients.append(jnp.where(hit, g, 0))
    if tiles:
        return _from_tiles(jnp.stack(gradients, axis=-1), geometry, in_spatial)
    return sum(scatter_back(d, o, geometry, in_spatial) for d, o in zip(gradients, window_offsets(geometry)))


def _is_maximum(values, y):
    """Where `values` equal their window's maximum `y` (broadcast), NaN counting as equal to NaN."""
    return (values == y) | (jnp.isnan(values) & jnp.isnan(y))


def _first_maximum_in_tiles(x_padded, y, g, geometry: Geometry, in_spatial):
    """The max-pool backward for windows that tile the input: each tile's first maximum is the least row-major
    offset among the positions equal to its maximum (one reduction over the tile), and the tile's cotangent goes
    to the position of that offset, written in the input's own layout (no offset-by-offset pass)."""
    tiled = _as_tiles(x_padded, geometry, geometry.spatial_shape(y.shape))
    tile_axes = tuple(axis + j + 1 for j, axis in enumerate(geometry.spatial_axes))  # each K right after its axis
    offsets_shape = [1] * tiled.ndim
    for axis, k in zip(tile_axes, geometry.kernel):
        offsets_shape[axis] = k
    offsets = np.arange(np.prod(geometry.kernel)).reshape(offsets_shape)  # row-major offset in the tile
    untiled = [n * k for n, k in zip(y.shape, full_rank(geometry, geometry.kernel, 1))]  # the whole tiles' shape
    y, g = jnp.expand_dims(y, tile_axes), jnp.expand_dims(g, tile_axes)
    first = jnp.min(jnp.where(_is_maximum(tiled, y), offsets, offsets.size), axis=tile_axes, keepdims=True)
    gradient = jnp.where(offsets == first, g, 0)
    return _tiles_to_input(gradient.reshape(untiled), geometry, in_spatial)


def _as_tiles(x_padded, geometry: Geometry, out_spatial):
    """The padded input cropped to whole tiles, each spatial axis split into (tiles, K): K right after it."""
    sizes, kernel = full_rank(geometry, out_spatial, None), full_rank(geometry, geometry.kernel, None)
    limits = tuple(n if k is None else o * k for n, o, k in zip(x_padded.shape, sizes, kernel))
    crop = lax.slice(x_padded, (0,) * x_padded.ndim, limits)
    shape = []
    for n, o, k in zip(crop.shape, sizes, kernel):
        shape.extend((n,) if k is None else (o, k))
    return crop.reshape(shape)


def _tile_view(tiled, offset, geometry: Geometry):
    """Element `offset` of every tile: the K axes of :func:`_as_tiles` indexed away."""
    for axis, k in zip(geometry.spatial_axes, offset):
        # spatial axis j sits at axis + j, its K axis at axis + j + 1; j earlier K axes are already gone
        tiled = lax.index_in_dim(tiled, k, axis + 1, keepdims=False)
    return tiled


def _from_tiles(gradients, geometry: Geometry, in_spatial):
    """(..., prod K) tile gradients, offsets row-major on the last axis, back to the input's shape: each K axis
    moved after its spatial axis and merged, then cut to the input (:func:`_tiles_to_input`)."""
    rank = gradients.ndim - 1
    gradients = gradients.reshape(*gradients.shape[:-1], *geometry.kernel)
    order = []
    for axis in range(rank):
        order.append(axis)
        if axis in geometry.spatial_axes:
            order.append(rank + geometry.spatial_axes.index(axis))
    shape = [n * k for n, k in zip(gradients.shape[:rank], full_rank(geometry, geometry.kernel, 1))]
    return _tiles_to_input(gradients.transpose(order).reshape(shape), geometry, in_spatial)


_custom_max_pool.defvjp(_custom_max_pool_fwd, _custom_max_pool_bwd)


def _gather_at_first_maximum(t, x, *, geometry: Geometry):
    """The max pool's JVP, linear in the tangent `t`: T[s i + k] at the first offset k (row-major) where X[s i + k]
    is the window's maximum (the switches), the adjoint of :func:`_scatter_to_first_maximum`."""
    y = _max_forward(x, geometry)
    x_padded, t_padded = pad_spatial(x, geometry, -jnp.inf), pad_spatial(t, geometry)
    out_spatial = geometry.spatial_shape(y.shape)
    taken, tangent = jnp.zeros(y.shape, bool), jnp.zeros(y.shape, t.dtype)
    for offset in window_offsets(geometry):
        hit = _is_maximum(window_view(x_padded, offset, geometry, out_spatial), y) & ~taken
        taken = taken | hit
        tangent = tangent + jnp.where(hit, window_view(t_padded, offset, geometry, out_spatial), 0)
    return tangent


def _scatter_to_first_maximum(g, x, *, geometry: Geometry):
    """The hand-derived max-pool backward (:func:`_first_maximum_gradient`) as a linear map of the cotangent `g`."""
    if g.size == 0:
        return jnp.zeros_like(x)
    with jax.named_scope("convlib.max_pool.dX"):
        return _first_maximum_gradient(x, _max_forward(x, geometry), g, geometry)


_at_first_maximum, _to_first_maximum = composable.linear_pair(
    "max_pool_switches", _gather_at_first_maximum, _scatter_to_first_maximum
)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _composable_max_pool(x, geometry: Geometry):
    return _max_forward(x, geometry)


@_composable_max_pool.defjvp
def _composable_max_pool_jvp(geometry, primals, tangents):
    """Y's tangent is X's tangent at the switches; the primal recurses so that higher orders use this rule too."""
    (x,), (t,) = primals, tangents
    return _composable_max_pool(x, geometry), _at_first_maximum(t, x, geometry=geometry)


def max_pool(
    x: ArrayLike,
    window: Size,
    stride: Size | None = None,
    padding: Padding = 0,
    *,
    ceil_mode: bool = False,
    layout: str = "NHWC",
    backward: str = "custom",
) -> jax.Array:
    """Max pooling over 1, 2 or 3 spatial dims; padding counts as -inf.

    Args:
      x: (N, *spatial, C) for "NHWC" or (N, C, *spatial) for "NCHW".
      window: int or one int per spatial dim. stride: defaults to window.
      padding: int, per-dim ints or (lo, hi) pairs, each at most half the window, or "SAME"/"VALID".
      ceil_mode: use `ceil` instead of `floor` for the output size (PyTorch's rule); a bool.
      layout: "NHWC" or "NCHW".
      backward: "custom" or "textbook" (both the hand-derived backward as a `custom_vjp`), "composable" (the same
        as transpose rules: forward mode too) or "autodiff".
    Returns:
      (N, *out_spatial, C) or (N, C, *out_spatial).

    >>> import jax.numpy as jnp
    >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    backward, x = check_backward(backward), jnp.asarray(as_float_array("x", x))
    geometry = pool_geometry(x, window, stride, padding, ceil_mode=ceil_mode, layout=layout)
    if backward == "autodiff":
        return _max_forward(x, geometry)
    if backward == "composable":
        return _composable_max_pool(x, geometry)
    with composable.forward_mode_hint(backward):
        return _custom_max_pool(x, geometry)


# --------------------------------------------------------------------------- average pool


def avg_pool_divisor(geometry: Geometry, explicit_padding, in_spatial, count_include_pad: bool) -> np.ndarray:
    """What each window sum is divided by, (*out_spatial,), computed from static shapes.

    With `count_include_pad` the explicit padding counts but the ceil-mode
    overhang (the rest of `geometry.padding`) does not, PyTorch's rule; without
    it only real input positions count.
    """
    if count_include_pad:
        counted = np.ones([h + lo + hi for h, (lo, hi) in zip(in_spatial, explicit_padding)], np.int64)
        overhang = [(0, hi - hi_explicit) for (_, hi), (_, hi_explicit) in zip(geometry.padding, explicit_padding)]
        counted = np.pad(counted, overhang)
    else:
        counted = np.pad(np.ones(in_spatial, np.int64), geometry.padding)
    windows = np.lib.stride_tricks.sliding_window_view(counted, geometry.kernel)
    windows = windows[tuple(slice(None, None, s) for s in geometry.stride)]
    return windows.sum(axis=tuple(range(-geometry.ndim, 0)))


def _avg_forward(x, geometry: Geometry, explicit_padding, count_include_pad: bool):
    divisor = avg_pool_divisor(geometry, explicit_padding, geometry.spatial_shape(x.shape), count_include_pad)
    return _reduce(x, 0.0, lax.add, geometry) / jnp.asarray(
        divisor.reshape(full_rank(geometry, divisor.shape, 1)), x.dtype
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _custom_avg_pool(x, geometry: Geometry, explicit_padding, count_include_pad: bool, x_shape):
    return _avg_forward(x, geometry, explicit_padding, count_include_pad)


def _custom_avg_pool_fwd(x, geometry, explicit_padding, count_include_pad, x_shape):
    # The backward needs only shapes; a zero-size slice of x carries its mesh-axis type.
    return _avg_forward(x, geometry, explicit_padding, count_include_pad), x.reshape(-1)[:0]


def _custom_avg_pool_bwd(geometry, explicit_padding, count_include_pad, x_shape, x_type, g):
    dx = _spread_average(
        g,
        geometry=geometry,
        explicit_padding=explicit_padding,
        count_include_pad=count_include_pad,
        in_spatial=geometry.spatial_shape(x_shape),
    )
    return (sum_to_primal_axes(dx, x_type),)


def _spread_average(g, *, geometry: Geometry, explicit_padding, count_include_pad: bool, in_spatial):
    """Spreads each output's cotangent evenly over its window: G / D to every position."""
    divisor = avg_pool_divisor(geometry, explicit_padding, in_spatial, count_include_pad)
    share = g / jnp.asarray(divisor.reshape(full_rank(geometry, divisor.shape, 1)), g.dtype)
    if g.size == 0:
        return jnp.zeros(geometry.axes.array_shape(g.shape[0], g.shape[geometry.channel_axis], in_spatial), g.dtype)
    with jax.named_scope("convlib.avg_pool.dX"):
        if geometry.stride == geometry.kernel:
            return _spread_over_tiles(share, geometry, in_spatial)
        return sum(scatter_back(share, offset, geometry, in_spatial) for offset in window_offsets(geometry))


def _spread_over_tiles(share, geometry: Geometry, in_spatial):
    """dE/dX when the windows tile the input (stride = window): position `s i + k` takes `share[i]` alone,
    so each spatial dim is repeated `K` times, then cropped to the input (the padding and the rows no
    window reads get nothing)."""
    for axis, k in zip(geometry.spatial_axes, geometry.kernel):
        share = jnp.repeat(share, k, axis=axis)
    return _tiles_to_input(share, geometry, in_spatial)


def _tiles_to_input(tiled, geometry: Geometry, in_spatial):
    """A gradient over the padded input's whole tiles cut to the input: the padding cropped, the rows no window
    reads zero-filled."""
    widths = [
        (-lo, h + lo - t, 0) for (lo, _), h, t in zip(geometry.padding, in_spatial, geometry.spatial_shape(tiled.shape))
    ]
    return lax.pad(tiled, jnp.zeros((), tiled.dtype), full_rank(geometry, widths, (0, 0, 0)))


_custom_avg_pool.defvjp(_custom_avg_pool_fwd, _custom_avg_pool_bwd)


def _average(x, *, geometry: Geometry, explicit_padding, count_include_pad: bool, in_spatial):
    """The avg-pool forward, a linear map of `x` (`in_spatial`: x's, for the signature its adjoint shares)."""
    return _avg_forward(x, geometry, explicit_padding, count_include_pad)


_average_by_primitive, _ = composable.linear_pair("avg_pool", _average, _spread_average)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _composable_avg_pool(x, geometry: Geometry, explicit_padding, count_include_pad: bool):
    return _avg_forward(x, geometry, explicit_padding, count_include_pad)


@_composable_avg_pool.defjvp
def _composable_avg_pool_jvp(geometry, explicit_padding, count_include_pad, primals, tangents):
    """A jaxpr of the forward shows the plain `reduce_window`; the tangent (and so every derivative) is the linear
    primitive, whose transpose is the hand-derived spreading."""
    (x,), (t,) = primals, tangents
    spatial = geometry.spatial_shape(x.shape)
    options = dict(explicit_padding=explicit_padding, count_include_pad=count_include_pad, in_spatial=spatial)
    y = _composable_avg_pool(x, geometry, explicit_padding, count_include_pad)
    return y, _average_by_primitive(t, geometry=geometry, **options)


def avg_pool(
    x: ArrayLike,
    window: Size,
    stride: Size | None = None,
    padding: Padding = 0,
    *,
    count_include_pad: bool = True,
    ceil_mode: bool = False,
    layout: str = "NHWC",
    backward: str = "custom",
) -> jax.Array:
    """Average pooling over 1, 2 or 3 spatial dims (PyTorch's `avg_pool{1,2,3}d` semantics).

    Args:
      x, window, stride, padding, ceil_mode, layout, backward: as in :func:`max_pool`.
      count_include_pad: whether zero padding counts in the divisor (a bool; the ceil-mode overhang never does).
    Returns:
      (N, *out_spatial, C) or (N, C, *out_spatial).

    >>> import jax.numpy as jnp
    >>> avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """
    backward, x = check_backward(backward), jnp.asarray(as_float_array("x", x))
    count_include_pad = check_bool("count_include_pad", count_include_pad)
    explicit = pool_geometry(x, window, stride, padding, layout=layout).padding
    geometry = pool_geometry(x, window, stride, padding, ceil_mode=ceil_mode, layout=layout)
    if backward == "autodiff":
        return _avg_forward(x, geometry, explicit, count_include_pad)
    if backward == "composable":
        return _composable_avg_pool(x, geometry, explicit, count_include_pad)
    with composable.forward_mode_hint(backward):
        return _custom_avg_pool(x, geometry, explicit, count_include_pad, tuple(x.shape))
