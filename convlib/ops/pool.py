"""Max and average pooling with hand-derived backward passes.

With window `K`, stride `s` and padding `(lo, hi)` per spatial dim, output `i`
reads the padded input at `s i + k` for the window offsets `k`. The backward
scatters each output's cotangent `G[i]` back to those positions, one window
offset at a time (a strided `lax.pad` per offset; for an average over windows that tile the input,
stride = window, a repeat of each spatial dim), and crops the padding:

    max:  dE/dX[s i + k] += G[i]          for the FIRST k (row-major) where X[s i + k] == Y[i]
    avg:  dE/dX[s i + k] += G[i] / D[i]   for every k, D = the divisor of the forward

Overlapping windows accumulate. Max-pool ties go to the first maximum in
row-major window order (PyTorch's and XLA's rule). A window holding NaN
outputs NaN (as in PyTorch) and its gradient goes to the first NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convlib.ops.conv import BACKWARDS, _as_array
from convlib.ops.geometry import Geometry, ceil_mode_padding, make_geometry
from convlib.ops.sharding import sum_to_primal_axes
from convlib.ops.windows import full_rank, pad_spatial, scatter_back, window_offsets, window_view


def pool_geometry(x, window, stride=None, padding=0, *, ceil_mode=False, layout="NHWC") -> Geometry:
    """Validates pooling arguments; returns the :class:`Geometry` (ceil mode folded into the padding)."""
    if not isinstance(layout, str) or layout.upper() not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"x must have rank 3, 4 or 5 (N, spatial..., C), got shape {x.shape}")
    ndim, layout = x.ndim - 2, layout.upper()
    in_spatial = x.shape[1:-1] if layout == "NHWC" else x.shape[2:]
    geometry = make_geometry(
        ndim,
        window,
        stride=window if stride is None else stride,
        padding=padding,
        layout=layout,
        in_spatial=in_spatial,
    )
    for (lo, hi), k in zip(geometry.padding, geometry.kernel):
        if not 0 <= lo <= k // 2 or not 0 <= hi <= k // 2:
            raise ValueError(f"padding must be between 0 and half the window {geometry.kernel}, got {padding!r}")
    if ceil_mode:
        pads = ceil_mode_padding(in_spatial, geometry.padding, geometry.kernel, geometry.stride)
        geometry = dataclasses.replace(geometry, padding=pads)
    return geometry


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
    x_padded = pad_spatial(x, geometry, -jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    y_is_nan = jnp.isnan(y)
    for offset in window_offsets(geometry):
        view = window_view(x_padded, offset, geometry, geometry.spatial_shape(y.shape))
        hit = ((view == y) | (jnp.isnan(view) & y_is_nan)) & ~taken
        taken = taken | hit
        dx = dx + scatter_back(jnp.where(hit, g, 0), offset, geometry, geometry.spatial_shape(x.shape))
    return (sum_to_primal_axes(dx, x),)


_custom_max_pool.defvjp(_custom_max_pool_fwd, _custom_max_pool_bwd)


def max_pool(x, window, stride=None, padding=0, *, ceil_mode=False, layout="NHWC", backward="custom"):
    """Max pooling over 1, 2 or 3 spatial dims; padding counts as -inf.

    Args:
      x: (N, *spatial, C) for "NHWC" or (N, C, *spatial) for "NCHW".
      window: int or one int per spatial dim. stride: defaults to window.
      padding: int, per-dim ints or (lo, hi) pairs, each at most half the window, or "SAME"/"VALID".
      ceil_mode: use `ceil` instead of `floor` for the output size (PyTorch's rule).
      backward: "custom"/"textbook" (hand-derived) or "autodiff".
    Returns:
      (N, *out_spatial, C) or (N, C, *out_spatial).
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    x = _as_array("x", x)
    geometry = pool_geometry(x, window, stride, padding, ceil_mode=ceil_mode, layout=layout)
    x = jnp.asarray(x)
    if backward == "autodiff":
        return _max_forward(x, geometry)
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
    """Spreads each output's cotangent evenly over its window: G / D to every position."""
    in_spatial = geometry.spatial_shape(x_shape)
    divisor = avg_pool_divisor(geometry, explicit_padding, in_spatial, count_include_pad)
    share = g / jnp.asarray(divisor.reshape(full_rank(geometry, divisor.shape, 1)), g.dtype)
    if g.size == 0:
        return (jnp.zeros(x_shape, g.dtype),)
    if geometry.stride == geometry.kernel:
        dx = _spread_over_tiles(share, geometry, in_spatial)
    else:
        dx = sum(scatter_back(share, offset, geometry, in_spatial) for offset in window_offsets(geometry))
    return (sum_to_primal_axes(dx, x_type),)


def _spread_over_tiles(share, geometry: Geometry, in_spatial):
    """dE/dX when the windows tile the input (stride = window): position `s i + k` takes `share[i]` alone,
    so each spatial dim is repeated `K` times, then cropped to the input (the padding and the rows no
    window reads get nothing)."""
    for axis, k in zip(geometry.spatial_axes, geometry.kernel):
        share = jnp.repeat(share, k, axis=axis)
    crops = [
        (-lo, h + lo - tiled, 0)
        for (lo, _), h, tiled in zip(geometry.padding, in_spatial, geometry.spatial_shape(share.shape))
    ]
    return lax.pad(share, jnp.zeros((), share.dtype), full_rank(geometry, crops, (0, 0, 0)))


_custom_avg_pool.defvjp(_custom_avg_pool_fwd, _custom_avg_pool_bwd)


def avg_pool(
    x,
    window,
    stride=None,
    padding=0,
    *,
    count_include_pad=True,
    ceil_mode=False,
    layout="NHWC",
    backward="custom",
):
    """Average pooling over 1, 2 or 3 spatial dims (PyTorch's `avg_pool{1,2,3}d` semantics).

    Args:
      x: (N, *spatial, C) for "NHWC" or (N, C, *spatial) for "NCHW".
      window: int or one int per spatial dim. stride: defaults to window.
      padding: int, per-dim ints or (lo, hi) pairs, each at most half the window, or "SAME"/"VALID".
      count_include_pad: whether zero padding counts in the divisor.
      ceil_mode: use `ceil` instead of `floor` for the output size.
      backward: "custom"/"textbook" (hand-derived) or "autodiff".
    Returns:
      (N, *out_spatial, C) or (N, C, *out_spatial).
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    x = _as_array("x", x)
    explicit = pool_geometry(x, window, stride, padding, layout=layout).padding
    geometry = pool_geometry(x, window, stride, padding, ceil_mode=ceil_mode, layout=layout)
    x, count_include_pad = jnp.asarray(x), bool(count_include_pad)
    if backward == "autodiff":
        return _avg_forward(x, geometry, explicit, count_include_pad)
    return _custom_avg_pool(x, geometry, explicit, count_include_pad, tuple(x.shape))
