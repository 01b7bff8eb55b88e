"""One source of truth for convolution and pooling geometry, and the checks every op shares at its boundary.

User arguments (stride, padding, dilation, groups, layout, ...) are validated and normalised once, at the API
boundary, into a frozen hashable :class:`Geometry`. The forward passes, the hand-derived backward passes, the
reference implementations and the receptive-field arithmetic all read it; none of them re-derives padding, and
none branches on the layout: every axis (batch, channel, spatial; the kernel's output, input and spatial axes)
comes from the layout's `lax` dimension numbers, in :class:`LayoutAxes`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from convlib.ops.checks import check_choice, check_int, is_int

LAYOUTS = ("NHWC", "NCHW")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
BACKWARDS = ("custom", "textbook", "autodiff", "composable")
"""The values of `backward=`: "custom" (hand-derived, fastest exact formulation), "textbook" (the lecture's
formulas as written), "autodiff" (JAX's own rules) and "composable" (the hand-derived formulas as transpose rules
of convlib primitives: every JAX transformation, forward mode included)."""

Pairs = tuple[tuple[int, int], ...]
Size = int | Sequence[int]  # one int for every spatial dim, or one per dim
Padding = int | str | Sequence[int] | Sequence[tuple[int, int]]  # see make_geometry


# --------------------------------------------------------------------------- the shared boundary checks


def check_layout(layout) -> str:
    """`layout` upper-cased if it names one of :data:`LAYOUTS` (any case).

    >>> check_layout("nchw")
    'NCHW'
    """
    if not isinstance(layout, str) or layout.upper() not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout.upper()


def check_backward(backward) -> str:
    """`backward` if it is one of :data:`BACKWARDS`."""
    return check_choice("backward", backward, BACKWARDS)


def as_float_array(name: str, a):
    """`a` as an array (JAX arrays and tracers pass through; lists become NumPy arrays) of a floating dtype."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        if a is None or isinstance(a, str | bytes | dict):
            raise TypeError(f"{name} must be an array of floats, got {a!r}")
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be an array of floats, got {a!r}") from error
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
    return a


def promote(*arrays):
    """The arrays (None passes) cast to their promoted dtype, as `jnp` arrays: the dtype rule of every op."""
    dtype = jnp.result_type(*(a for a in arrays if a is not None))
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in arrays)


# --------------------------------------------------------------------------- axes of a layout


@dataclasses.dataclass(frozen=True)
class LayoutAxes:
    """Where each dimension sits in an array and in a kernel of one layout, read off its `lax` dimension numbers.

    "NHWC": x (N, *S, C), kernel (*K, C_in / groups, C_out); "NCHW": x (N, C, *S), kernel (C_out, C_in / groups, *K).

    >>> layout_axes("NHWC", 2).kernel_out, layout_axes("NCHW", 2).kernel_out
    (3, 0)
    """

    dimension_numbers: lax.ConvDimensionNumbers

    @property
    def batch(self) -> int:
        return self.dimension_numbers.lhs_spec[0]

    @property
    def channel(self) -> int:
        return self.dimension_numbers.lhs_spec[1]

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.dimension_numbers.lhs_spec[2:])

    @property
    def kernel_out(self) -> int:
        return self.dimension_numbers.rhs_spec[0]

    @property
    def kernel_in(self) -> int:
        return self.dimension_numbers.rhs_spec[1]

    @property
    def kernel_spatial(self) -> tuple[int, ...]:
        return tuple(self.dimension_numbers.rhs_spec[2:])

    def array_shape(self, batch: int, channels: int, spatial: Sequence[int]) -> tuple[int, ...]:
        """The shape of an input or output with these sizes."""
        return _place(self.dimension_numbers.lhs_spec, (batch, channels, *spatial))

    def kernel_shape(self, kernel: Sequence[int], in_per_group: int, out: int) -> tuple[int, ...]:
        """The shape of a kernel with these sizes."""
        return _place(self.dimension_numbers.rhs_spec, (out, in_per_group, *kernel))

    def bias_shape(self, channels: int) -> tuple[int, ...]:
        """A bias of `channels` entries shaped to broadcast against an output (its batch axis dropped)."""
        return self.array_shape(1, channels, (1,) * len(self.spatial))[1:]


def _place(spec: Sequence[int], sizes: Sequence[int]) -> tuple[int, ...]:
    shape = [0] * len(spec)
    for axis, size in zip(spec, sizes):
        shape[axis] = size
    return tuple(shape)


@functools.cache
def layout_axes(layout: str, ndim: int) -> LayoutAxes:
    """The axes of `layout` ("NHWC" or "NCHW") for `ndim` spatial dims: the one place the layout is decoded."""
    spatial = tuple(range(2, 2 + ndim))
    if check_layout(layout) == "NHWC":
        lhs = (0, ndim + 1) + tuple(range(1, ndim + 1))
        rhs = (ndim + 1, ndim) + tuple(range(ndim))
        return LayoutAxes(lax.ConvDimensionNumbers(lhs, rhs, lhs))
    spec = (0, 1) + spatial
    return LayoutAxes(lax.ConvDimensionNumbers(spec, spec, spec))


def dilated_size(size: int, factor: int) -> int:
    """Length of `size` samples spaced `factor` apart: `factor (size - 1) + 1` (0 for none)."""
    return 0 if size == 0 else factor * (size - 1) + 1


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static geometry of one convolution or pooling window, for `ndim` spatial dims.

    Attributes:
      kernel: spatial kernel (or window) size, one int per spatial dim.
      stride: window step per spatial dim.
      padding: explicit `(lo, hi)` zero padding per spatial dim (negative = cropping).
      dilation: kernel dilation per spatial dim.
      groups: filter groups (1 for pooling).
      layout: "NHWC" (channels last, kernel (*K, I, O)) or "NCHW" (channels first,
        kernel (O, I, *K)), for 1, 2 or 3 spatial dims alike.
      padding_mode: how the `padding` is filled: "zeros", "reflect", "replicate"
        or "circular" (PyTorch's names and semantics).
    """

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pairs
    dilation: tuple[int, ...]
    groups: int = 1
    layout: str = "NHWC"
    padding_mode: str = "zeros"

    @property
    def ndim(self) -> int:
        return len(self.kernel)

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        """Extent of the dilated kernel: `dilation * (kernel - 1) + 1`."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def axes(self) -> LayoutAxes:
        """The axes of this layout (batch, channel, spatial; the kernel's out, in and spatial axes)."""
        return layout_axes(self.layout, self.ndim)

    @property
    def channel_axis(self) -> int:
        return self.axes.channel

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        return self.axes.spatial

    @property
    def dimension_numbers(self) -> lax.ConvDimensionNumbers:
        """`lax` dimension numbers of (input, kernel, output) for this layout."""
        return self.axes.dimension_numbers

    def spatial_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self.spatial_axes)

    def output_spatial(self, in_spatial: Sequence[int]) -> tuple[int, ...]:
        """Output size per dim: `floor((H + lo + hi - K_eff) / stride) + 1`."""
        return tuple(
            (h + lo + hi - k) // s + 1
            for h, (lo, hi), k, s in zip(in_spatial, self.padding, self.effective_kernel, self.stride)
        )

    def input_shape(self, g_shape: Sequence[int], w_shape: Sequence[int], in_spatial: Sequence[int]) -> tuple[int, ...]:
        """The input's shape, (N, *in_spatial, C_in) or (N, C_in, *in_spatial), from the output gradient's shape (its
        batch) and the kernel's (C_in / groups): what dE/dX has."""
        axes = self.axes
        return axes.array_shape(g_shape[axes.batch], self.groups * w_shape[axes.kernel_in], in_spatial)


# --------------------------------------------------------------------------- parsing


def int_tuple(name: str, value, ndim: int, minimum: int = 1) -> tuple[int, ...]:
    """An int or a length-`ndim` sequence of ints, each >= `minimum`, as a tuple."""
    values = (value,) * ndim if is_int(value) else value
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != ndim:
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}")
    if not all(is_int(v) for v in values):
        raise TypeError(f"{name} must contain ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in values)


def check_padding(padding, ndim: int) -> Pairs | str:
    """`padding` normalised: "SAME" or "VALID" (any case), or one `(lo, hi)` pair per spatial dim from an int, `ndim`
    ints or `ndim` pairs.

    >>> check_padding("same", 2), check_padding(1, 2)
    ('SAME', ((1, 1), (1, 1)))
    """
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(f"padding must be an int, a sequence, 'SAME' or 'VALID'; got {padding!r}")
    if is_int(padding):
        return ((int(padding), int(padding)),) * ndim
    if isinstance(padding, Sequence) and len(padding) == ndim:
        if all(is_int(p) for p in padding):
            return tuple((int(p), int(p)) for p in padding)
        if all(isinstance(p, Sequence) and len(p) == 2 and all(is_int(q) for q in p) for p in padding):
            return tuple((int(lo), int(hi)) for lo, hi in padding)
    raise ValueError(f"padding must be an int, {ndim} ints, {ndim} (lo, hi) pairs, 'SAME' or 'VALID'; got {padding!r}")


def same_padding(in_spatial, kernel, stride, dilation) -> Pairs:
    """'SAME' padding: output `ceil(H / stride)`; an odd total pad puts the extra at the end.

    For stride 1 this is PyTorch's `padding='same'`; for larger strides it is XLA's SAME.
    """
    pads = []
    for h, k, s, d in zip(in_spatial, kernel, stride, dilation):
        total = max((-(-h // s) - 1) * s + d * (k - 1) + 1 - h, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def ceil_mode_padding(in_spatial, padding: Pairs, kernel, stride) -> Pairs:
    """Extra high padding that makes the output size `ceil(...)` instead of `floor(...)`.

    PyTorch's rule: the last window must start inside the input or the low padding.
    """
    pads = []
    for h, (lo, hi), k, s in zip(in_spatial, padding, kernel, stride):
        span = h + lo + hi - k
        out = -(-span // s) + 1
        if (out - 1) * s >= h + lo:
            out -= 1
        pads.append((lo, hi + max((out - 1) * s - span, 0)))
    return tuple(pads)


def make_geometry(
    ndim: int,
    kernel: Size,
    *,
    stride: Size = 1,
    padding: Padding = 0,
    dilation: Size = 1,
    groups: int = 1,
    layout: str = "NHWC",
    padding_mode: str = "zeros",
    in_spatial: Sequence[int] | None = None,
    channels: tuple[int, int] | None = None,
) -> Geometry:
    """Validates user arguments and resolves them into a :class:`Geometry`: the one check of each of them.

    `in_spatial` (the input's spatial shape) is needed only to resolve "SAME" padding and to check that the kernel
    fits the padded input; `channels` (input, output), only to check that `groups` divides both.

    >>> make_geometry(2, 3, padding="SAME", in_spatial=(8, 8)).padding
    ((1, 1), (1, 1))
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"only 1, 2 or 3 spatial dimensions are supported, got {ndim}")
    layout = check_layout(layout)
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    groups = check_int("groups", groups, minimum=1)
    if channels is not None and any(c % groups for c in channels):
        raise ValueError(
            f"groups={groups} must divide both input channels ({channels[0]}) and output channels ({channels[1]})"
        )
    kernel = int_tuple("kernel size", kernel, ndim)
    stride = int_tuple("stride", stride, ndim)
    dilation = int_tuple("dilation", dilation, ndim)

    pads = check_padding(padding, ndim)
    if pads == "VALID":
        pads = ((0, 0),) * ndim
    elif pads == "SAME":
        if in_spatial is None:
            raise ValueError("padding='SAME' needs the input's spatial shape (in_spatial)")
        pads = same_padding(in_spatial, kernel, stride, dilation)

    geometry = Geometry(kernel, stride, pads, dilation, groups, layout, padding_mode)
    if in_spatial is not None:
        check_fits(geometry, in_spatial)
    return geometry


def check_fits(geometry: Geometry, in_spatial: Sequence[int]) -> None:
    """Raises ValueError unless the padded input is at least as large as the dilated kernel."""
    for axis, (h, (lo, hi), k) in enumerate(zip(in_spatial, geometry.padding, geometry.effective_kernel)):
        if h + lo + hi < k:
            raise ValueError(
                f"kernel size {geometry.kernel} (dilated extent {k} on spatial dim {axis}) is larger "
                f"than the padded input ({h} + padding {(lo, hi)})"
            )
        if geometry.padding_mode != "zeros":
            if lo < 0 or hi < 0:
                raise ValueError(f"negative padding {geometry.padding} is only allowed with padding_mode='zeros'")
            limit = h - 1 if geometry.padding_mode == "reflect" else h
            if geometry.padding_mode != "replicate" and max(lo, hi) > limit:
                raise ValueError(
                    f"padding {(lo, hi)} on spatial dim {axis} is too large for padding_mode="
                    f"{geometry.padding_mode!r} with input size {h} (at most {limit})"
                )
            if geometry.padding_mode == "replicate" and h == 0 and max(lo, hi) > 0:
                raise ValueError(f"padding_mode='replicate' needs a non-empty input on spatial dim {axis}")


# --------------------------------------------------------------------------- the boundary of conv


def input_spatial_ndim(x) -> int:
    """The number of spatial dims of an input `x` of rank 3, 4 or 5 (batch and channel axes besides)."""
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"x must have rank 3, 4 or 5 (N, spatial..., C), got shape {x.shape}")
    return x.ndim - 2


def conv_geometry(
    x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros", layout="NHWC"
) -> Geometry:
    """Validates the arguments of :func:`convlib.ops.conv` (arrays or anything with `shape`) and returns their
    :class:`Geometry`."""
    layout = check_layout(layout)
    ndim = input_spatial_ndim(x)
    if w.ndim != x.ndim:
        raise ValueError(f"w must have the same rank as x ({x.ndim}), got shape {w.shape}")
    axes = layout_axes(layout, ndim)
    w_in, c_out, c_in = w.shape[axes.kernel_in], w.shape[axes.kernel_out], x.shape[axes.channel]
    geometry = make_geometry(
        ndim,
        tuple(w.shape[a] for a in axes.kernel_spatial),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
        padding_mode=padding_mode,
        in_spatial=tuple(x.shape[a] for a in axes.spatial),
        channels=(c_in, c_out),
    )
    if w_in * geometry.groups != c_in:
        raise ValueError(
            f"x has {c_in} input channels but w of shape {w.shape} expects {w_in} x groups={groups} = {w_in * groups}"
        )
    if b is not None and tuple(b.shape) != (c_out,):
        raise ValueError(f"b must have shape ({c_out},), got {tuple(b.shape)}")
    return geometry
