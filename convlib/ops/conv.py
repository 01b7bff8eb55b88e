"""Cross-correlation with a hand-derived backward pass.

Notation (one spatial dim shown; every spatial dim works alike): the input
`X` has size `H`, the kernel `W` has size `K` and dilation `d` (extent
`K_eff = d (K - 1) + 1`), the stride is `s`, the zero padding `(lo, hi)`, and
the output `H_out = floor((H + lo + hi - K_eff) / s) + 1`. The forward is

    Y[n, o, i] = b[o] + sum_{c, k} X_pad[n, c, s i + d k] W[o, c, k]

and, with `G = dE/dY`, the backward the lecture derives is

    dE/db = sum_{n, i} G                                     (sum over batch and space)
    dE/dW = X  (*)  G          cross-correlation of the input with G; the roles of
                               stride and dilation swap: window step d, G dilated by s
    dE/dX = G_s (*) rot180(W)  "full" cross-correlation of G, dilated by s and padded
                               by (K_eff - 1 - lo, H + lo - (s (H_out - 1) + 1)),
                               with the kernel rotated by 180 degrees and its in/out
                               channels swapped within each group

where `(*)` is cross-correlation. Negative pads are crops: rows the forward
never read (output size not divisible by the stride, negative padding) get a
zero gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from convlib.ops.geometry import Geometry, int_tuple, make_geometry
from convlib.ops.sharding import sum_to_primal_axes

BACKWARDS = ("custom", "textbook", "autodiff")

_NUMPY_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


# --------------------------------------------------------------------------- boundary


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {jnp.result_type(a)}")


def _as_array(name: str, a):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        a = np.asarray(a)
    _check_float(name, a)
    return a


def conv_geometry(
    x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", layout="NHWC"
) -> Geometry:
    """Validates the arguments of :func:`conv` and returns their :class:`Geometry`."""
    if not isinstance(layout, str) or layout.upper() not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    layout = layout.upper()
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"x must have rank 3, 4 or 5 (N, spatial..., C), got shape {x.shape}")
    if w.ndim != x.ndim:
        raise ValueError(f"w must have the same rank as x ({x.ndim}), got shape {w.shape}")
    ndim = x.ndim - 2
    if layout == "NHWC":
        kernel, w_in, c_out, c_in = w.shape[:ndim], w.shape[ndim], w.shape[ndim + 1], x.shape[-1]
        in_spatial = x.shape[1:-1]
    else:
        kernel, w_in, c_out, c_in = w.shape[2:], w.shape[1], w.shape[0], x.shape[1]
        in_spatial = x.shape[2:]
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(
            f"groups={groups!r} must be >= 1 and divide both input channels ({c_in}) and output channels ({c_out})"
        )
    if w_in * groups != c_in:
        raise ValueError(
            f"x has {c_in} input channels but w of shape {w.shape} expects {w_in} x groups={groups} = {w_in * groups}"
        )
    if b is not None and tuple(b.shape) != (c_out,):
        raise ValueError(f"b must have shape ({c_out},), got {tuple(b.shape)}")
    if any(k == 0 for k in kernel):
        raise ValueError(f"kernel size must be >= 1, got w of shape {w.shape}")
    return make_geometry(
        ndim,
        tuple(kernel),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
        padding_mode=padding_mode,
        in_spatial=in_spatial,
    )


def pad_input(x, geometry: Geometry):
    """Applies a non-zero padding mode explicitly; returns `(x_padded, geometry_with_zero_padding)`.

    Zero padding stays inside the convolution (it is free there); "reflect",
    "replicate" and "circular" fill the border with `jnp.pad` first, as PyTorch does.
    """
    if geometry.padding_mode == "zeros":
        return x, geometry
    widths = [(0, 0)] * x.ndim
    for axis, pad in zip(geometry.spatial_axes, geometry.padding):
        widths[axis] = pad
    x = jnp.pad(x, widths, mode=_NUMPY_PAD_MODE[geometry.padding_mode])
    return x, dataclasses.replace(geometry, padding=((0, 0),) * geometry.ndim, padding_mode="zeros")


def _bias_shape(geometry: Geometry, c_out: int) -> tuple[int, ...]:
    return (c_out,) if geometry.layout == "NHWC" else (c_out,) + (1,) * geometry.ndim


# --------------------------------------------------------------------------- forward and backward


def _dilated(size: int, factor: int) -> int:
    """Length of `size` samples spaced `factor` apart."""
    return 0 if size == 0 else factor * (size - 1) + 1


def _conv_general_dilated(
    lhs, rhs, *, window_strides, padding, dimension_numbers, lhs_dilation=None, rhs_dilation, **groups
):
    """`lax.conv_general_dilated` (same arguments), working around a slow path of XLA:CPU.

    XLA:CPU runs a conv whose (dilated) input is shorter than the kernel's extent
    along some spatial dim on a generic loop up to 30x slower than its conv library
    (a 2x2 map under a 3x3 kernel, as in VGG's last block: 1.1 s against 41 ms). On a
    CPU such a conv gets its padding and input dilation materialised with `lax.pad`,
    behind an optimisation barrier so that XLA cannot fold them back; the sums are the same.
    The hand-derived backward runs its convs through here too; `backward="autodiff"` keeps the plain
    conv, since JAX's transpose of the materialised padding lands on the slow path again.
    """
    lhs_spatial, rhs_spatial = dimension_numbers.lhs_spec[2:], dimension_numbers.rhs_spec[2:]
    lhs_dilation = lhs_dilation or (1,) * len(lhs_spatial)
    narrow = any(
        _dilated(lhs.shape[a], s) < _dilated(rhs.shape[b], d)
        for a, b, s, d in zip(lhs_spatial, rhs_spatial, lhs_dilation, rhs_dilation)
    )
    if narrow and jax.default_backend() == "cpu":
        widths = [(0, 0, 0)] * lhs.ndim
        for axis, (lo, hi), s in zip(lhs_spatial, padding, lhs_dilation):
            widths[axis] = (lo, hi, s - 1)
        lhs = lax.optimization_barrier(lax.pad(lhs, jnp.zeros((), lhs.dtype), widths))
        padding, lhs_dilation = [(0, 0)] * len(lhs_spatial), None
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


def _forward(x, w, b, geometry: Geometry, conv_general_dilated=_conv_general_dilated):
    """Y = X (*) W + b with `lax.conv_general_dilated` (or the given drop-in for it)."""
    y = conv_general_dilated(
        x,
        w,
        window_strides=geometry.stride,
        padding=geometry.padding,
        rhs_dilation=geometry.dilation,
        dimension_numbers=geometry.dimension_numbers,
        feature_group_count=geometry.groups,
    )
    if b is not None:
        y = y + b.reshape(_bias_shape(geometry, b.shape[0]))
    return y


def _flipped_transposed_kernel(w, geometry: Geometry):
    """rot180(W) with input and output channels swapped within each group.

    (*K, I/g, O) -> (*K, O/g, I) in NHWC; (O, I/g, *K) -> (I, O/g, *K) in NCHW.
    """
    n, g = geometry.ndim, geometry.groups
    if geometry.layout == "NHWC":
        w = jnp.flip(w, axis=tuple(range(n)))
        *kernel, i_g, o = w.shape
        w = w.reshape(*kernel, i_g, g, o // g)
        w = jnp.swapaxes(w, n, n + 2)  # (*K, O/g, g, I/g)
        return w.reshape(*kernel, o // g, g * i_g)
    w = jnp.flip(w, axis=tuple(range(2, 2 + n)))
    o, i_g, *kernel = w.shape
    w = w.reshape(g, o // g, i_g, *kernel)
    w = jnp.swapaxes(w, 1, 2)  # (g, I/g, O/g, *K)
    return w.reshape(g * i_g, o // g, *kernel)


def full_correlation_padding(geometry: Geometry, in_spatial, out_spatial) -> list[tuple[int, int]]:
    """Padding (lo, hi) per spatial dim of the stride-dilated `G` in the full correlation giving dE/dX:
    `(K_eff - 1 - lo, H + lo - (s (H_out - 1) + 1))`, negative entries cropping."""
    return [
        (k - 1 - lo, h + lo - _dilated(o, s))
        for k, (lo, _), h, o, s in zip(
            geometry.effective_kernel, geometry.padding, in_spatial, out_spatial, geometry.stride
        )
    ]


def input_gradient(g, w, geometry: Geometry, in_spatial):
    """dE/dX: full correlation of the stride-dilated, padded `g` with rot180(W).

    g: output cotangent, w: kernel (same layout as the forward). Returns (N, *in_spatial, C_in)
    (or channels first). This is also :func:`conv_transpose`.
    """
    return _conv_general_dilated(
        g,
        _flipped_transposed_kernel(w, geometry),
        window_strides=(1,) * geometry.ndim,
        padding=full_correlation_padding(geometry, in_spatial, geometry.spatial_shape(g.shape)),
        lhs_dilation=geometry.stride,
        rhs_dilation=geometry.dilation,
        dimension_numbers=geometry.dimension_numbers,
        feature_group_count=geometry.groups,
    )


def _transposed(spec: tuple[int, ...]) -> tuple[int, ...]:
    """Swaps the first two entries of a dimension spec (batch <-> feature)."""
    return (spec[1], spec[0]) + spec[2:]


def weight_gradient(x, g, geometry: Geometry, kernel_shape):
    """dE/dW: correlation of the input with `g`, stride and dilation swapped.

    The batch is contracted (the input's channels play the batch role, `g`'s
    batch plays the input-feature role); groups split the channels with
    `batch_group_count`. Returns the kernel's shape and layout.
    """
    if x.size == 0 or g.size == 0:
        return jnp.zeros(kernel_shape, jnp.result_type(x, g))
    lhs, rhs, out = geometry.dimension_numbers
    in_spatial, out_spatial = geometry.spatial_shape(x.shape), geometry.spatial_shape(g.shape)
    pads = [
        (lo, _dilated(o, s) - h + k - lo - 1)
        for k, (lo, _), h, o, s in zip(
            geometry.effective_kernel, geometry.padding, in_spatial, out_spatial, geometry.stride
        )
    ]
    return _conv_general_dilated(
        x,
        g,
        window_strides=geometry.dilation,
        padding=pads,
        rhs_dilation=geometry.stride,
        dimension_numbers=lax.ConvDimensionNumbers(_transposed(lhs), _transposed(out), _transposed(rhs)),
        batch_group_count=geometry.groups,
    )


def bias_gradient(g, geometry: Geometry):
    """dE/db: the sum of `g` over batch and space."""
    return jnp.sum(g, axis=tuple(a for a in range(g.ndim) if a != geometry.channel_axis))


def _textbook_backward(geometry: Geometry, residuals, g):
    x, w, b = residuals
    dx = jnp.zeros_like(x) if g.size == 0 else input_gradient(g, w, geometry, geometry.spatial_shape(x.shape))
    dw = weight_gradient(x, g, geometry, w.shape)
    db = None if b is None else bias_gradient(g, geometry).astype(g.dtype)
    return dx, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _custom_conv(x, w, b, geometry: Geometry, backward: str):
    return _forward(x, w, b, geometry)


def _custom_conv_fwd(x, w, b, geometry, backward):
    return _forward(x, w, b, geometry), (x, w, b)


def _custom_conv_bwd(geometry, backward, residuals, g):
    """Runs the strategy `backward` names: "textbook" (the lecture's) or "custom" (`fast_backward`)."""
    from convlib.ops import fast_backward  # it builds on this module's textbook pieces

    strategy = fast_backward.backward if backward == "custom" else _textbook_backward
    grads = strategy(geometry, residuals, g)
    return jax.tree.map(sum_to_primal_axes, grads, residuals)


_custom_conv.defvjp(_custom_conv_fwd, _custom_conv_bwd)


# --------------------------------------------------------------------------- public API


def conv(
    x,
    w,
    b=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    layout="NHWC",
    backward="custom",
):
    """N-d cross-correlation (what `torch.nn.functional.conv{1,2,3}d` computes).

    Args:
      x: input, (N, *spatial, C_in) for layout "NHWC" or (N, C_in, *spatial) for "NCHW";
        1, 2 or 3 spatial dims, inferred from the rank.
      w: kernel, (*K, C_in / groups, C_out) for "NHWC" or (C_out, C_in / groups, *K) for "NCHW".
      b: optional bias, (C_out,).
      stride, dilation: int or one int per spatial dim.
      padding: int, one int per spatial dim (symmetric), one (lo, hi) pair per
        spatial dim (negative crops), or "SAME" / "VALID".
      groups: filter groups; must divide C_in and C_out.
      padding_mode: "zeros", "reflect", "replicate" or "circular" (PyTorch semantics).
      layout: "NHWC" (default, the fast path) or "NCHW" (PyTorch's convention).
      backward: "custom" (hand-derived `custom_vjp`), "textbook" (the same, always
        the lecture's formulation) or "autodiff" (JAX's own transpose rules).

    Returns:
      y: (N, *out_spatial, C_out) or (N, C_out, *out_spatial), dtype promoted from x, w, b.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    x, w = _as_array("x", x), _as_array("w", w)
    b = None if b is None else _as_array("b", b)
    geometry = conv_geometry(
        x,
        w,
        b,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        layout=layout,
    )
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    b = None if b is None else jnp.asarray(b, dtype)
    x, geometry = pad_input(x, geometry)
    if backward == "autodiff":
        return _forward(x, w, b, geometry, lax.conv_general_dilated)
    return _custom_conv(x, w, b, geometry, backward)


def convolve(x, w, b=None, **kwargs):
    """True convolution: :func:`conv` with the kernel rotated by 180 degrees.

    Same arguments as :func:`conv`. The lecture's contrast: convolution flips
    the kernel, cross-correlation (what CNN layers compute) does not.
    """
    layout = kwargs.get("layout", "NHWC")
    w = _as_array("w", w)
    spatial = range(w.ndim - 2) if str(layout).upper() == "NHWC" else range(2, w.ndim)
    return conv(x, jnp.flip(w, axis=tuple(spatial)), b, **kwargs)


def conv_transpose(x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1, layout="NHWC"):
    """Transposed convolution: the adjoint of :func:`conv` with the same `w`.

    `w` is the kernel of the forward conv whose adjoint this is, so x has that
    conv's C_out channels: in NCHW, w is (C_in_of_x, C_out / groups, *K) exactly as
    `torch.nn.functional.conv_transpose{1,2,3}d` expects. Output size per dim:
    `(H - 1) * stride - lo - hi + dilation * (K - 1) + 1 + output_padding`.

    Args:
      x: (N, *spatial, C) or (N, C, *spatial); w: (*K, C_out / groups, C) or (C, C_out / groups, *K).
      b: optional bias, (C_out,).
      padding: int, ints or (lo, hi) pairs — the padding of the forward conv (not "SAME").
      output_padding: int or per-dim ints added at the high end, each < stride or < dilation.
    Returns:
      (N, *out_spatial, C_out) or (N, C_out, *out_spatial).
    """
    x, w = _as_array("x", x), _as_array("w", w)
    if not isinstance(layout, str) or layout.upper() not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if x.ndim not in (3, 4, 5) or w.ndim != x.ndim:
        raise ValueError(f"x and w must have equal rank 3, 4 or 5, got shapes {x.shape} and {w.shape}")
    if isinstance(padding, str):
        raise ValueError(f"padding must be explicit for conv_transpose, got {padding!r}")
    ndim, layout = x.ndim - 2, layout.upper()
    kernel = w.shape[:ndim] if layout == "NHWC" else w.shape[2:]
    c_x = x.shape[-1] if layout == "NHWC" else x.shape[1]
    c_w = w.shape[-1] if layout == "NHWC" else w.shape[0]
    if c_x != c_w:
        raise ValueError(f"x has {c_x} channels but w of shape {w.shape} expects {c_w}")
    if not isinstance(groups, int) or groups < 1 or c_w % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing the channels of x ({c_w})")
    geometry = make_geometry(
        ndim, tuple(kernel), stride=stride, padding=padding, dilation=dilation, groups=groups, layout=layout
    )
    extra = int_tuple("output_padding", output_padding, ndim, minimum=0)
    for e, s, d in zip(extra, geometry.stride, geometry.dilation):
        if e < 0 or e >= max(s, d):
            raise ValueError(f"output_padding must be >= 0 and < stride or dilation, got {output_padding!r}")
    in_spatial = tuple(
        (o - 1) * s - lo - hi + k + e
        for o, s, (lo, hi), k, e in zip(
            geometry.spatial_shape(x.shape), geometry.stride, geometry.padding, geometry.effective_kernel, extra
        )
    )
    if any(h < 0 for h in in_spatial):
        raise ValueError(f"padding {padding!r} is too large: the output would have spatial shape {in_spatial}")
    dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
    y = input_gradient(jnp.asarray(x, dtype), jnp.asarray(w, dtype), geometry, in_spatial)
    if b is not None:
        y = y + jnp.asarray(b, dtype).reshape(_bias_shape(geometry, y.shape[geometry.channel_axis]))
    return y
