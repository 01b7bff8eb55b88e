"""`Conv`: an NNX layer over :func:`convlib.ops.conv` for 1, 2 or 3 spatial dims."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from convlib import ops
from convlib.nn.validation import (
    check_axis_name,
    check_backward,
    check_bool,
    check_floating_dtype,
    check_positive_int,
    check_rngs,
    layer_geometry,
    layer_ndim,
)
from convlib.ops.geometry import promote


def he_normal(layout: str, ndim: int = 2):
    """He et al. (2015) init for a kernel in the ops layout: truncated normal, variance 2 / fan_in.

    fan_in = prod(K) * C_in / groups, read from the kernel's input-feature axis
    and spatial axes: (*K, C_in/g, C_out) for "NHWC", (C_out, C_in/g, *K) for "NCHW".
    """
    axes = ops.layout_axes(layout, ndim)
    return jax.nn.initializers.he_normal(in_axis=axes.kernel_in, out_axis=axes.kernel_out)


class Conv(nnx.Module):
    """Convolution (cross-correlation) layer: y = ops.conv(x, kernel, bias, ...).

    Shapes: x (N, *S, C_in) -> y (N, *S_out, C_out) for layout "NHWC"; (N, C_in, *S) ->
    (N, C_out, *S_out) for "NCHW". The kernel is stored in the ops layout,
    (*K, C_in/groups, C_out) or (C_out, C_in/groups, *K); the bias is (C_out,).

    Args:
      in_features, out_features: C_in and C_out.
      kernel_size: int or a tuple with one int per spatial dim; a tuple fixes the
        number of spatial dims, an int uses `ndim` (default 2).
      stride, padding, dilation, groups, padding_mode, layout, backward: as in
        :func:`convlib.ops.conv` (padding may be "SAME"/"VALID").
      use_bias: add a learned bias.
      dtype: compute dtype; x, kernel and bias are cast to it before the conv.
        None: the promoted dtype of x and the parameters.
      param_dtype: dtype the parameters are stored in.
      kernel_init: `init(key, shape, dtype)`; default He normal (:func:`he_normal`).
      bias_init: default zeros.
      output_sharding: a mesh axis name to split the output channels over (model
        parallelism, see `convlib.train.model_parallel`); needs an active mesh
        (`jax.set_mesh`). None: XLA decides.
      rngs: `nnx.Rngs` with a `params` (or `default`) stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size,
        *,
        ndim: int | None = None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        use_bias: bool = True,
        padding_mode: str = "zeros",
        layout: str = "NHWC",
        backward: str = "custom",
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=None,
        bias_init=nnx.initializers.zeros,
        output_sharding: str | None = None,
        rngs: nnx.Rngs,
    ):
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        self.ndim = layer_ndim("kernel_size", kernel_size, ndim)
        geometry = layer_geometry(
            self.ndim,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            layout=layout,
            padding_mode=padding_mode,
            channels=(in_features, out_features),
        )
        self.layout, self.backward = geometry.layout, check_backward(backward)
        self.in_features, self.out_features, self.groups = in_features, out_features, geometry.groups
        self.kernel_size, self.stride, self.dilation = geometry.kernel, geometry.stride, geometry.dilation
        self.padding = padding.upper() if isinstance(padding, str) else geometry.padding
        self.padding_mode = padding_mode
        self.dtype = check_floating_dtype("dtype", dtype, allow_none=True)
        self.param_dtype = check_floating_dtype("param_dtype", param_dtype)
        self.output_sharding = check_axis_name("output_sharding", output_sharding)
        use_bias, rngs = check_bool("use_bias", use_bias), check_rngs(rngs)

        shape = geometry.axes.kernel_shape(self.kernel_size, in_features // self.groups, out_features)
        init = he_normal(self.layout, self.ndim) if kernel_init is None else kernel_init
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

    def geometry(self, in_spatial) -> ops.Geometry:
        """The ops :class:`~convlib.ops.Geometry` of this layer for inputs of spatial shape `in_spatial`."""
        return ops.make_geometry(
            self.ndim,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            layout=self.layout,
            padding_mode=self.padding_mode,
            in_spatial=tuple(in_spatial),
        )

    def output_spatial(self, in_spatial) -> tuple[int, ...]:
        """Spatial output shape for inputs of spatial shape `in_spatial`."""
        return self.geometry(in_spatial).output_spatial(in_spatial)

    def __call__(self, x: jax.Array) -> jax.Array:
        params = (self.kernel[...],) + (() if self.bias is None else (self.bias[...],))
        if self.dtype is None:
            x, *params = promote(x, *params)
        else:
            x, *params = (jnp.asarray(a, self.dtype) for a in (x, *params))
        conv = functools.partial(
            ops.conv,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            layout=self.layout,
            backward=self.backward,
        )
        if self.output_sharding is None:
            return conv(x, *params, groups=self.groups)
        return self._split_conv(conv, x, params)

    def _split_conv(self, conv, x, params):
        """Each device computes its share of the output channels (`shard_map` over `output_sharding`).

        groups divisible by the device count: a device reads only its own input channels (the paper's
        columns); groups=1: every device reads all input channels (XLA gathers them first).
        """
        axis, axes = self.output_sharding, ops.layout_axes(self.layout, self.ndim)
        mesh_axes = jax.sharding.get_abstract_mesh().shape
        if axis not in mesh_axes:
            raise ValueError(
                f"output_sharding={axis!r} names no axis of the active mesh (axes: {tuple(mesh_axes)}); "
                "enter one with jax.set_mesh"
            )
        devices = mesh_axes[axis]
        if self.groups % devices and self.groups != 1:
            raise ValueError(f"groups={self.groups} must be 1 or divisible by the {devices} devices of {axis!r}")
        split = [None] * x.ndim
        split[axes.channel] = axis
        kernel = [None] * x.ndim
        kernel[axes.kernel_out] = axis
        x_spec = P(*split) if self.groups > 1 else P()
        per_device = functools.partial(conv, groups=max(self.groups // devices, 1))
        in_specs = (x_spec, P(*kernel)) + ((P(axis),) if len(params) == 2 else ())
        return jax.shard_map(per_device, in_specs=in_specs, out_specs=P(*split))(x, *params)
