"""The lecture's three ways to compute a convolution, side by side.

- `conv_loops`: explicit loops over output positions and kernel offsets
  (NumPy, float64): slow, obvious, the test oracle.
- `conv_im2col`: serialisation. Every receptive field is unrolled into a row
  of one large patch matrix, (N * H_out * W_out, K * K * C_in / groups), and the
  convolution becomes one matrix product per group with the kernel matrix.
- `conv_lax`: `jax.lax.conv_general_dilated`, what `convlib.ops.conv` runs.

All three take exactly the arguments of :func:`convlib.ops.conv` (except
`backward`) and read the same :class:`~convlib.ops.geometry.Geometry`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from convlib.ops import textbook
from convlib.ops.geometry import Geometry, as_float_array, conv_geometry, promote
from convlib.ops.windows import pad_input, pad_spatial, window_offsets, window_view


def _prepare(x, w, b, kwargs):
    """Validates like `conv`, promotes the dtypes, applies the padding mode; returns (x, w, b, geometry)."""
    x, w = as_float_array("x", x), as_float_array("w", w)
    b = None if b is None else as_float_array("b", b)
    geometry = conv_geometry(x, w, b, **kwargs)
    x, w, b = promote(x, w, b)
    x, geometry = pad_input(x, geometry)
    return x, w, b, geometry


def _channels_last_order(geometry: Geometry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Axis orders that bring an input to (N, *S, C) and a kernel to (*K, C_in / g, C_out), from the specs."""
    lhs, rhs, _ = geometry.dimension_numbers
    return (lhs[0], *lhs[2:], lhs[1]), (*rhs[2:], rhs[1], rhs[0])


def conv_loops(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, **kwargs) -> np.ndarray:
    """Cross-correlation by explicit loops, in float64 NumPy. Same arguments and layout as `conv`.

    y[n, o, i] = b[o] + sum over kernel offsets k and the input channels c of o's group
                 of x_pad[n, c, s i + d k] * w[o, c, k]

    >>> import numpy as np
    >>> conv_loops(np.arange(4.0).reshape(1, 4, 1), np.ones((2, 1, 1)))[0, :, 0]
    array([1., 3., 5.])
    """
    with jax.enable_x64(True):  # float64 inputs stay float64 through the (jnp) padding
        x, w, b, geometry = _prepare(x, w, b, kwargs)
        x_pad = np.asarray(pad_spatial(x, geometry), np.float64)
    lhs, rhs, out = geometry.dimension_numbers
    x_pad = np.transpose(x_pad, lhs)  # (N, C, *S)
    w = np.transpose(np.asarray(w, np.float64), rhs)  # (C_out, C_in / g, *K)
    c_out, c_group = w.shape[:2]
    o_group = c_out // geometry.groups
    out_spatial = geometry.output_spatial(geometry.spatial_shape(x.shape))
    y = np.zeros((x_pad.shape[0], c_out, *out_spatial))
    for out_index in np.ndindex(*out_spatial):
        for offset in np.ndindex(*geometry.kernel):
            position = tuple(s * i + d * k for s, i, d, k in zip(geometry.stride, out_index, geometry.dilation, offset))
            for group in range(geometry.groups):
                inputs = x_pad[(slice(None), slice(group * c_group, (group + 1) * c_group), *position)]
                weights = w[(slice(group * o_group, (group + 1) * o_group), slice(None), *offset)]
                y[(slice(None), slice(group * o_group, (group + 1) * o_group), *out_index)] += inputs @ weights.T
    if b is not None:
        y += np.asarray(b, np.float64).reshape((c_out,) + (1,) * geometry.ndim)
    return np.moveaxis(y, range(y.ndim), out)


def conv_im2col(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, **kwargs) -> jax.Array:
    """Cross-correlation as one matrix product per group over the unrolled patches. Same arguments as `conv`.

    patches: (N, *out, prod(K), C_in) gathered with one strided view per kernel offset;
    per group: (N * prod(out), prod(K) * C_in/g) @ (prod(K) * C_in/g, C_out/g).
    """
    x, w, b, geometry = _prepare(x, w, b, kwargs)
    x_order, w_order = _channels_last_order(geometry)
    x_pad = pad_spatial(x, geometry)
    out_spatial = geometry.output_spatial(geometry.spatial_shape(x.shape))
    views = [jnp.transpose(window_view(x_pad, k, geometry, out_spatial), x_order) for k in window_offsets(geometry)]
    n, g, c_in = x.shape[geometry.axes.batch], geometry.groups, x.shape[geometry.channel_axis]
    patches = jnp.stack(views, axis=-2).reshape(n, *out_spatial, len(views), g, c_in // g)  # (..., prod(K), g, C/g)
    kernel = jnp.transpose(w, w_order)  # (*K, C/g, C_out)
    kernel = kernel.reshape(len(views), kernel.shape[-2], g, -1)  # (prod(K), C/g, g, C_out/g)
    y = jnp.einsum("...kgc,kcgo->...go", patches, kernel).reshape(n, *out_spatial, g * kernel.shape[-1])
    if b is not None:
        y = y + b
    return jnp.transpose(y, np.argsort(x_order))


def conv_lax(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, **kwargs) -> jax.Array:
    """Cross-correlation with `lax.conv_general_dilated` (autodiff backward). Same arguments as `conv`."""
    x, w, b, geometry = _prepare(x, w, b, kwargs)
    return textbook.forward(geometry, x, w, b, lax.conv_general_dilated)


IMPLEMENTATIONS = {"loops": conv_loops, "im2col": conv_im2col, "lax": conv_lax}
"""The lecture's three implementations by name, as :func:`conv_by` takes them."""


def conv_by(method: str, x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, **kwargs) -> jax.Array:
    """Cross-correlation computed the named way: "loops", "im2col" or "lax"."""
    if method not in IMPLEMENTATIONS:
        raise ValueError(f"method must be one of {tuple(IMPLEMENTATIONS)}, got {method!r}")
    return IMPLEMENTATIONS[method](x, w, b, **kwargs)
