"""The public convolutions: :func:`conv` (cross-correlation, with its hand-derived `custom_vjp`), :func:`convolve`
and :func:`conv_transpose`.

The forward and the backward formulas are in :mod:`convlib.ops.textbook`; `backward` picks who computes the
gradients, through one table each for the forward and the backward: "textbook" (the lecture's formulas, always),
"custom" (the same sums in the order :mod:`convlib.ops.plan` measured fastest on this platform), "autodiff"
(the textbook forward with JAX's own transpose rules, no `custom_vjp`), or "composable" (the formulas as the
transpose rules of convlib primitives, :mod:`convlib.ops.composable`: forward mode and every other transformation).

The primal is one plain conv in every mode: outside differentiation, and in every jaxpr of a forward pass, a conv is a
single `lax.conv_general_dilated` (plus bias; :data:`PRIMAL`), so that tools reading jaxprs see a convolution. The
faster forwards run only under differentiation, in the `custom_vjp`'s `fwd` (:data:`FORWARDS`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from convlib.ops import composable, plan, textbook
from convlib.ops.formulation import Formulation
from convlib.ops.geometry import (
    Geometry,
    Padding,
    Size,
    as_float_array,
    check_backward,
    check_layout,
    conv_geometry,
    int_tuple,
    layout_axes,
    make_geometry,
    promote,
)
from convlib.ops.sharding import sum_to_primal_axes
from convlib.ops.windows import pad_input

FORWARDS = {"textbook": plan.FORWARD_TEXTBOOK, "custom": plan.planned_forward}
"""`(geometry, x, w, b) -> Y` of each hand-derived mode under differentiation (the `custom_vjp`'s `fwd`)."""
GRADIENTS = {"textbook": plan.TEXTBOOK, "custom": plan.planned_gradients}
"""`(geometry, x, w, g) -> (dE/dX, dE/dW)` of each hand-derived backward."""
PRIMAL = Formulation(
    "primal", functools.partial(textbook.forward, conv=textbook.single_conv), plan.FORWARD_TEXTBOOK.scope
)
"""Y outside differentiation, in every mode: one `conv_general_dilated` (+ bias), what a jaxpr of the forward shows."""
AUTODIFF = Formulation(
    "autodiff", functools.partial(textbook.forward, conv=lax.conv_general_dilated), plan.FORWARD_TEXTBOOK.scope
)
"""Y of `backward="autodiff"`: the plain conv, differentiated by JAX's own transpose rules."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _conv(geometry: Geometry, x, w, b, backward: str):
    return PRIMAL(geometry, x, w, b)


def _conv_fwd(geometry, x, w, b, backward):
    return FORWARDS[backward](geometry, x, w, b), (x, w, b)


def _conv_bwd(geometry, backward, residuals, g):
    """The gradients by `GRADIENTS[backward]`, summed over the mesh axes a replicated operand was broadcast on."""
    grads = textbook.backward(geometry, residuals, g, GRADIENTS[backward])
    return jax.tree.map(sum_to_primal_axes, grads, residuals)


_conv.defvjp(_conv_fwd, _conv_bwd)


# --------------------------------------------------------------------------- public API


def conv(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: Size = 1,
    padding: Padding = 0,
    dilation: Size = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    layout: str = "NHWC",
    backward: str = "custom",
) -> jax.Array:
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
        the lecture's formulation), "autodiff" (JAX's own transpose rules) or "composable"
        (the hand-derived formulas as transpose rules: forward mode too).

    Returns:
      y: (N, *out_spatial, C_out) or (N, C_out, *out_spatial), dtype promoted from x, w, b.

    >>> import jax, jax.numpy as jnp
    >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    >>> conv(x, w, stride=2, padding="SAME").shape
    (2, 4, 4, 4)
    >>> grad = lambda backward: jax.grad(lambda w: conv(x, w, padding=1, backward=backward).sum())(w)
    >>> bool(jnp.allclose(grad("custom"), grad("autodiff")))
    True
    """
    backward = check_backward(backward)
    x, w = as_float_array("x", x), as_float_array("w", w)
    b = None if b is None else as_float_array("b", b)
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
    x, w, b = promote(x, w, b)
    x, geometry = pad_input(x, geometry)
    if backward == "autodiff":
        return AUTODIFF(geometry, x, w, b)
    if backward == "composable":
        return composable.forward(geometry, x, w, b)
    with composable.forward_mode_hint(backward):
        return _conv(geometry, x, w, b, backward)


def convolve(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, **kwargs) -> jax.Array:
    """True convolution: :func:`conv` with the kernel rotated by 180 degrees.

    Same arguments as :func:`conv`. The lecture's contrast: convolution flips the kernel, cross-correlation (what
    CNN layers compute) does not.

    >>> import jax.numpy as jnp
    >>> x, w = jnp.arange(3.0).reshape(1, 3, 1), jnp.array([1.0, 0.0]).reshape(2, 1, 1)
    >>> convolve(x, w)[0, :, 0], conv(x, w)[0, :, 0]
    (Array([1., 2.], dtype=float32), Array([0., 1.], dtype=float32))
    """
    w = as_float_array("w", w)
    axes = layout_axes(kwargs.get("layout", "NHWC"), w.ndim - 2)
    return conv(x, jnp.flip(w, axis=axes.kernel_spatial), b, **kwargs)


def conv_transpose(
    x: ArrayLike,
    w: ArrayLike,
    b: ArrayLike | None = None,
    *,
    stride: Size = 1,
    padding: Padding = 0,
    output_padding: Size = 0,
    dilation: Size = 1,
    groups: int = 1,
    layout: str = "NHWC",
    backward: str = "custom",
) -> jax.Array:
    """Transposed convolution: the adjoint of :func:`conv` with the same `w`.

    `w` is the kernel of the forward conv whose adjoint this is, so x has that conv's C_out channels: in NCHW, w is
    (C_in_of_x, C_out / groups, *K) exactly as `torch.nn.functional.conv_transpose{1,2,3}d` expects. Output size
    per dim: `(H - 1) * stride - lo - hi + dilation * (K - 1) + 1 + output_padding`.

    Args:
      x: (N, *spatial, C) or (N, C, *spatial); w: (*K, C_out / groups, C) or (C, C_out / groups, *K).
      b: optional bias, (C_out,).
      padding: int, ints or (lo, hi) pairs — the padding of the forward conv (not "SAME").
      output_padding: int or per-dim ints added at the high end, each < stride or < dilation.
      backward: "composable" makes it the conv's dE/dX primitive (its derivatives the hand-derived conv and dE/dW);
        any other mode differentiates the textbook dE/dX with JAX's own rules.
    Returns:
      (N, *out_spatial, C_out) or (N, C_out, *out_spatial).

    >>> import jax.numpy as jnp
    >>> conv_transpose(jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 2, 8)), stride=2, padding=1, output_padding=1).shape
    (1, 8, 8, 2)
    """
    x, w = as_float_array("x", x), as_float_array("w", w)
    b = None if b is None else as_float_array("b", b)
    layout, backward = check_layout(layout), check_backward(backward)
    if x.ndim not in (3, 4, 5) or w.ndim != x.ndim:
        raise ValueError(f"x and w must have equal rank 3, 4 or 5, got shapes {x.shape} and {w.shape}")
    if isinstance(padding, str):
        raise ValueError(f"padding must be explicit for conv_transpose, got {padding!r}")
    ndim = x.ndim - 2
    axes = layout_axes(layout, ndim)
    c_x, c_w = x.shape[axes.channel], w.shape[axes.kernel_out]
    if c_x != c_w:
        raise ValueError(f"x has {c_x} channels but w of shape {w.shape} expects {c_w}")
    kernel = tuple(w.shape[a] for a in axes.kernel_spatial)
    geometry = make_geometry(
        ndim,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
        channels=(c_x, w.shape[axes.kernel_in] * groups),
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
    c_out = w.shape[axes.kernel_in] * geometry.groups
    if b is not None and tuple(b.shape) != (c_out,):
        raise ValueError(f"b must have shape ({c_out},), got {tuple(b.shape)}")
    x, w, b = promote(x, w, b)
    gradient = composable.input_gradient if backward == "composable" else textbook.input_gradient
    y = gradient(geometry, x, w, in_spatial)
    return y if b is None else y + b.reshape(axes.bias_shape(b.shape[0]))
