"""Cross-correlation and its backward pass as the lecture derives them: the reference every faster formulation
must equal.

Notation (one spatial dim shown; every spatial dim works alike): the input `X` has size `H`, the kernel `W` has
size `K` and dilation `d` (extent `K_eff = d (K - 1) + 1`), the stride is `s`, the zero padding `(lo, hi)`, and
the output `H_out = floor((H + lo + hi - K_eff) / s) + 1`. The forward is

    Y[n, o, i] = b[o] + sum_{c, k} X_pad[n, c, s i + d k] W[o, c, k]

and, with `G = dE/dY`, the backward is

    dE/db = sum_{n, i} G                                     (sum over batch and space)
    dE/dW = X  (*)  G          cross-correlation of the input with G; the roles of
                               stride and dilation swap: window step d, G dilated by s
    dE/dX = G_s (*) rot180(W)  "full" cross-correlation of G, dilated by s and padded
                               by (K_eff - 1 - lo, H + lo - (s (H_out - 1) + 1)),
                               with the kernel rotated by 180 degrees and its in/out
                               channels swapped within each group

where `(*)` is cross-correlation. Negative pads are crops: rows the forward never read (output size not
divisible by the stride, negative padding) get a zero gradient. Every axis comes from the layout's dimension
numbers (`Geometry.axes`): the same code serves NHWC and NCHW, 1, 2 and 3 spatial dims.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from convlib.ops.geometry import Geometry, dilated_size


def conv_general_dilated(
    lhs, rhs, *, window_strides, padding, dimension_numbers, lhs_dilation=None, rhs_dilation, **groups
):
    """`lax.conv_general_dilated` (same arguments), working around a slow path of XLA:CPU.

    XLA:CPU runs a conv whose (dilated) input is shorter than the kernel's extent along some spatial dim on a
    generic loop up to 30x slower than its conv library (a 2x2 map under a 3x3 kernel, as in VGG's last block:
    1.1 s against 41 ms). On a CPU (`lax.platform_dependent`: decided where the program is lowered, not by the
    default backend) such a conv gets its padding and input dilation materialised (:func:`single_conv`); the
    sums are the same. The differentiated path (the planned forward and the hand-derived backward) runs its convs
    through here; `backward="autodiff"` keeps the plain conv, since JAX's transpose of the materialised padding
    lands on the slow path again.
    """
    arguments = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        **groups,
    )
    if not _narrow(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation):
        return lax.conv_general_dilated(lhs, rhs, **arguments)
    return lax.platform_dependent(
        lhs,
        rhs,
        cpu=lambda lhs, rhs: single_conv(lhs, rhs, **arguments),
        default=lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, **arguments),
    )


def single_conv(lhs, rhs, *, window_strides, padding, dimension_numbers, lhs_dilation=None, rhs_dilation, **groups):
    """`lax.conv_general_dilated` (same arguments) as one conv on every platform, no platform branch: what the
    primal of a convlib conv runs, so that every jaxpr of a forward pass shows one `conv_general_dilated`.

    An input shorter than the kernel's extent (:func:`conv_general_dilated`'s slow path of XLA:CPU) gets its
    padding and input dilation materialised by `lax.pad`, behind an optimisation barrier so that XLA cannot fold
    them back into the conv; elsewhere this is `lax.conv_general_dilated` itself.
    """
    if _narrow(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation):
        spatial = dimension_numbers.lhs_spec[2:]
        widths = [(0, 0, 0)] * lhs.ndim
        for axis, (lo, hi), s in zip(spatial, padding, lhs_dilation or (1,) * len(spatial)):
            widths[axis] = (lo, hi, s - 1)
        lhs = lax.optimization_barrier(lax.pad(lhs, jnp.zeros((), lhs.dtype), widths))
        padding, lhs_dilation = [(0, 0)] * len(spatial), None
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        **groups,
    )


def _narrow(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation) -> bool:
    """Whether the (dilated) input is shorter than the kernel's extent along some spatial dim."""
    lhs_spatial, rhs_spatial = dimension_numbers.lhs_spec[2:], dimension_numbers.rhs_spec[2:]
    lhs_dilation = lhs_dilation or (1,) * len(lhs_spatial)
    return any(
        dilated_size(lhs.shape[a], s) < dilated_size(rhs.shape[b], d)
        for a, b, s, d in zip(lhs_spatial, rhs_spatial, lhs_dilation, rhs_dilation)
    )


def forward(geometry: Geometry, x, w, b, conv=conv_general_dilated):
    """Y = X (*) W + b with `conv`: :func:`conv_general_dilated` (the differentiated path), :func:`single_conv`
    (the primal) or `lax.conv_general_dilated` (autodiff)."""
    y = conv(
        x,
        w,
        window_strides=geometry.stride,
        padding=geometry.padding,
        rhs_dilation=geometry.dilation,
        dimension_numbers=geometry.dimension_numbers,
        feature_group_count=geometry.groups,
    )
    return y if b is None else y + b.reshape(geometry.axes.bias_shape(b.shape[0]))


def flipped_kernel(w, geometry: Geometry):
    """rot180(W) with input and output channels swapped within each group: `(kernel, dimension_numbers)` of the
    correlation that gives dE/dX (the forward's dimension numbers with input and output swapped).

    Spec-driven, as JAX's own transpose rule: the kernel's spatial axes are reversed; with groups, the output axis
    (g groups of C_out / g) gives up its group factor to the input axis (C_in / g -> C_in), so that read through
    the swapped spec the kernel maps each group's C_out / g channels back to its C_in / g.
    """
    lhs, rhs, out = geometry.dimension_numbers
    w = jnp.flip(w, axis=rhs[2:])
    if geometry.groups > 1:
        w = _move_factor(w, geometry.groups, source=rhs[0], target=rhs[1])
    return w, lax.ConvDimensionNumbers(out, _transposed(rhs), lhs)


def _move_factor(a, factor: int, source: int, target: int):
    """Splits axis `source` into (factor, rest) and merges the factor into axis `target`, outermost (JAX's
    `_reshape_axis_out_of` then `_reshape_axis_into`)."""
    shape = list(a.shape)
    shape[source : source + 1] = [factor, shape[source] // factor]
    a = a.reshape(shape)
    order = [i for i in range(a.ndim) if i != source]
    order.insert(target, source)
    merged = [a.shape[i] for i in order]
    merged[target : target + 2] = [merged[target] * merged[target + 1]]
    return lax.reshape(a, merged, order)


def _transposed(spec: tuple[int, ...]) -> tuple[int, ...]:
    """Swaps the first two entries of a dimension spec (batch <-> feature, or out <-> in)."""
    return (spec[1], spec[0]) + spec[2:]


def full_correlation_padding(geometry: Geometry, in_spatial, out_spatial) -> list[tuple[int, int]]:
    """Padding (lo, hi) per spatial dim of the stride-dilated `G` in the full correlation giving dE/dX:
    `(K_eff - 1 - lo, H + lo - (s (H_out - 1) + 1))`, negative entries cropping."""
    return [
        (k - 1 - lo, h + lo - dilated_size(o, s))
        for k, (lo, _), h, o, s in zip(
            geometry.effective_kernel, geometry.padding, in_spatial, out_spatial, geometry.stride
        )
    ]


def weight_gradient_padding(geometry: Geometry, in_spatial, out_spatial) -> list[tuple[int, int]]:
    """Padding (lo, hi) per spatial dim of `X` in the correlation giving dE/dW: the forward's `lo`, and a `hi`
    that makes the window (G dilated by s) take exactly `K` steps of `d`: `s (H_out - 1) + 1 - H + K_eff - lo - 1`."""
    return [
        (lo, dilated_size(o, s) - h + k - lo - 1)
        for k, (lo, _), h, o, s in zip(
            geometry.effective_kernel, geometry.padding, in_spatial, out_spatial, geometry.stride
        )
    ]


def input_gradient(geometry: Geometry, g, w, in_spatial):
    """dE/dX: full correlation of the stride-dilated, padded `g` with rot180(W).

    g: output cotangent (N, *out_spatial, C_out) or channels first; w: the forward's kernel. Returns
    (N, *in_spatial, C_in) or channels first. This is also :func:`convlib.ops.conv_transpose`.
    """
    kernel, dimension_numbers = flipped_kernel(w, geometry)
    return conv_general_dilated(
        g,
        kernel,
        window_strides=(1,) * geometry.ndim,
        padding=full_correlation_padding(geometry, in_spatial, geometry.spatial_shape(g.shape)),
        lhs_dilation=geometry.stride,
        rhs_dilation=geometry.dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=geometry.groups,
    )


def weight_gradient(geometry: Geometry, x, g, kernel_shape):
    """dE/dW: correlation of the input with `g`, stride and dilation swapped.

    The batch is contracted (the input's channels play the batch role, `g`'s batch plays the input-feature role);
    groups split the channels with `batch_group_count`. Returns the kernel's shape and layout (zeros when nothing
    flows back: a conv with an empty output does not lower).
    """
    if x.size == 0 or g.size == 0:
        return jnp.zeros(kernel_shape, jnp.result_type(x, g))
    lhs, rhs, out = geometry.dimension_numbers
    return conv_general_dilated(
        x,
        g,
        window_strides=geometry.dilation,
        padding=weight_gradient_padding(geometry, geometry.spatial_shape(x.shape), geometry.spatial_shape(g.shape)),
        rhs_dilation=geometry.stride,
        dimension_numbers=lax.ConvDimensionNumbers(_transposed(lhs), _transposed(out), _transposed(rhs)),
        batch_group_count=geometry.groups,
    )


def bias_gradient(g, geometry: Geometry):
    """dE/db: the sum of `g` over batch and space, (C_out,)."""
    return jnp.sum(g, axis=tuple(a for a in range(g.ndim) if a != geometry.channel_axis))


def backward(geometry: Geometry, residuals, g, gradients):
    """(dE/dX, dE/dW, dE/db) of `conv(x, w, b)` from the residuals (x, w, b or None) and the cotangent `g`.

    `gradients(geometry, x, w, g) -> (dE/dX, dE/dW)`: the formulation (a plan of :mod:`convlib.ops.plan`); it is
    called only when something flows back (x and g non-empty), else the gradients are zeros.
    """
    x, w, b = residuals
    if x.size == 0 or g.size == 0:
        dx, dw = jnp.zeros_like(x), jnp.zeros(w.shape, jnp.result_type(x, g))
    else:
        dx, dw = gradients(geometry, x, w, g)
    return dx, dw, None if b is None else bias_gradient(g, geometry).astype(g.dtype)
