"""Sliding windows as strided views: the building block of pooling, im2col and the tap-by-tap formulations.

A window offset `k` (one int per spatial dim) meets input position `s i + d k` of the padded input for output
`i`; `window_view` gathers those positions for every output at once, and `scatter_back` is its adjoint. The
padding itself: `pad_spatial` (a constant, negative pads crop) and `pad_input` (PyTorch's padding modes).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
from jax import lax

from convlib.ops.geometry import Geometry


def full_rank(geometry: Geometry, spatial_values, fill) -> tuple:
    """Per-axis tuple for a whole array: `spatial_values` on the spatial axes, `fill` elsewhere."""
    values = [fill] * (geometry.ndim + 2)
    for axis, v in zip(geometry.spatial_axes, spatial_values):
        values[axis] = v
    return tuple(values)


def pad_spatial(x, geometry: Geometry, value=0.0):
    """x padded by `geometry.padding` with `value` (negative pads crop)."""
    config = full_rank(geometry, [(lo, hi, 0) for lo, hi in geometry.padding], (0, 0, 0))
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


_NUMPY_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def pad_input(x, geometry: Geometry):
    """Applies a non-zero padding mode explicitly; returns `(x_padded, geometry_with_zero_padding)`.

    Zero padding stays inside the convolution (it is free there); "reflect", "replicate" and "circular" fill the
    border with `jnp.pad` first, as PyTorch does.
    """
    if geometry.padding_mode == "zeros":
        return x, geometry
    x = jnp.pad(x, full_rank(geometry, geometry.padding, (0, 0)), mode=_NUMPY_PAD_MODE[geometry.padding_mode])
    return x, dataclasses.replace(geometry, padding=((0, 0),) * geometry.ndim, padding_mode="zeros")


def window_offsets(geometry: Geometry):
    """All kernel offsets, row-major: (0, 0), (0, 1), ..."""
    return itertools.product(*(range(k) for k in geometry.kernel))


def window_view(x_padded, offset, geometry: Geometry, out_spatial):
    """The padded input each output reads at one window offset: (N, *out_spatial, C) or channels first."""
    start = [k * d for k, d in zip(offset, geometry.dilation)]
    stop = [b + s * (n - 1) + 1 for b, s, n in zip(start, geometry.stride, out_spatial)]
    stop = tuple(x_padded.shape[a] if v is None else v for a, v in enumerate(full_rank(geometry, stop, None)))
    return lax.slice(x_padded, full_rank(geometry, start, 0), stop, full_rank(geometry, geometry.stride, 1))


def scatter_back(contribution, offset, geometry: Geometry, in_spatial):
    """Adjoint of `window_view` followed by padding: puts `contribution` at input
    positions `s i + d k - lo` (zeros elsewhere, padding cropped). Returns the input's shape."""
    out_spatial = geometry.spatial_shape(contribution.shape)
    config = [
        (k * d - lo, h + lo - k * d - s * (n - 1) - 1, s - 1)
        for k, d, (lo, _), h, s, n in zip(
            offset, geometry.dilation, geometry.padding, in_spatial, geometry.stride, out_spatial
        )
    ]
    return lax.pad(contribution, jnp.zeros((), contribution.dtype), full_rank(geometry, config, (0, 0, 0)))
