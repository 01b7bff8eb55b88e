"""Pooling layers over :func:`convlib.ops.max_pool` and :func:`convlib.ops.avg_pool`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import ops
from convlib.nn.reshape import flatten
from convlib.nn.validation import check_backward, check_bool, check_layout, layer_geometry, layer_ndim
from convlib.ops.pool import check_pool_padding


class _Pool(nnx.Module):
    """Window, stride and padding shared by the pools; subclasses name the op and its extra arguments."""

    def __init__(self, window, stride, padding, *, ndim, ceil_mode, layout, backward):
        self.ndim = layer_ndim("window", window, ndim)
        geometry = layer_geometry(
            self.ndim, window, stride=window if stride is None else stride, padding=padding, layout=layout
        )
        self.layout, self.backward = geometry.layout, check_backward(backward)
        if not isinstance(padding, str):
            check_pool_padding(geometry, padding)
        self.window, self.stride = geometry.kernel, geometry.stride
        self.padding = padding.upper() if isinstance(padding, str) else geometry.padding
        self.ceil_mode = check_bool("ceil_mode", ceil_mode)

    def _pool(self, x):
        raise NotImplementedError

    def output_spatial(self, in_spatial) -> tuple[int, ...]:
        """Spatial output shape for inputs of spatial shape `in_spatial` (traced abstractly, no compute)."""
        axes = ops.layout_axes(self.layout, self.ndim)
        y = jax.eval_shape(self._pool, jax.ShapeDtypeStruct(axes.array_shape(1, 1, in_spatial), jnp.float32))
        return tuple(y.shape[a] for a in axes.spatial)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x)


class MaxPool(_Pool):
    """Max pooling: x (N, *S, C) -> (N, *S_out, C) ("NHWC"; channels first for "NCHW").

    Args as :func:`convlib.ops.max_pool`: window (int or tuple; an int uses `ndim`,
    default 2), stride (default window), padding (-inf), ceil_mode, layout, backward.
    """

    def __init__(self, window, stride=None, padding=0, *, ndim=None, ceil_mode=False, layout="NHWC", backward="custom"):
        super().__init__(window, stride, padding, ndim=ndim, ceil_mode=ceil_mode, layout=layout, backward=backward)

    def _pool(self, x):
        return ops.max_pool(
            x,
            self.window,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            layout=self.layout,
            backward=self.backward,
        )


class AvgPool(_Pool):
    """Average pooling: x (N, *S, C) -> (N, *S_out, C) ("NHWC"; channels first for "NCHW").

    Args as :func:`convlib.ops.avg_pool`: window, stride, padding, count_include_pad,
    ceil_mode, layout, backward; an int window uses `ndim` (default 2).
    """

    def __init__(
        self,
        window,
        stride=None,
        padding=0,
        *,
        ndim=None,
        count_include_pad=True,
        ceil_mode=False,
        layout="NHWC",
        backward="custom",
    ):
        super().__init__(window, stride, padding, ndim=ndim, ceil_mode=ceil_mode, layout=layout, backward=backward)
        self.count_include_pad = check_bool("count_include_pad", count_include_pad)

    def _pool(self, x):
        return ops.avg_pool(
            x,
            self.window,
            self.stride,
            self.padding,
            count_include_pad=self.count_include_pad,
            ceil_mode=self.ceil_mode,
            layout=self.layout,
            backward=self.backward,
        )


class GlobalAvgPool(nnx.Module):
    """Mean over all spatial positions: x (N, *S, C) -> (N, C) ("NHWC"; (N, C, *S) for "NCHW").

    One :func:`convlib.ops.avg_pool` whose window is the whole input, so the
    `backward` switch reaches it like every other pool.
    """

    def __init__(self, *, layout="NHWC", backward="custom"):
        self.layout = check_layout(layout)
        self.backward = check_backward(backward)

    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = tuple(x.shape[a] for a in ops.layout_axes(self.layout, x.ndim - 2).spatial)
        y = ops.avg_pool(x, spatial, layout=self.layout, backward=self.backward)
        return flatten(y)
