"""One source of truth for convolution and pooling geometry.

User arguments (stride, padding, dilation, groups, layout, ...) are validated and
normalised once, at the API boundary, into a frozen hashable :class:`Geometry`.
The forward passes, the hand-derived backward passes, the reference
implementations and the receptive-field arithmetic all read it; none of them
re-derives padding on its own.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

from jax import lax

LAYOUTS = ("NHWC", "NCHW")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

Pairs = tuple[tuple[int, int], ...]


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
    def channel_axis(self) -> int:
        return self.ndim + 1 if self.layout == "NHWC" else 1

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        first = 1 if self.layout == "NHWC" else 2
        return tuple(range(first, first + self.ndim))

    @property
    def dimension_numbers(self) -> lax.ConvDimensionNumbers:
        """`lax` dimension numbers of (input, kernel, output) for this layout."""
        spatial = tuple(range(2, 2 + self.ndim))
        if self.layout == "NHWC":
            lhs = (0, self.ndim + 1) + tuple(range(1, self.ndim + 1))
            rhs = (self.ndim + 1, self.ndim) + tuple(range(self.ndim))
            return lax.ConvDimensionNumbers(lhs, rhs, lhs)
        return lax.ConvDimensionNumbers((0, 1) + spatial, (0, 1) + spatial, (0, 1) + spatial)

    def spatial_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self.spatial_axes)

    def output_spatial(self, in_spatial: Sequence[int]) -> tuple[int, ...]:
        """Output size per dim: `floor((H + lo + hi - K_eff) / stride) + 1`."""
        return tuple(
            (h + lo + hi - k) // s + 1
            for h, (lo, hi), k, s in zip(in_spatial, self.padding, self.effective_kernel, self.stride)
        )


# --------------------------------------------------------------------------- parsing


def int_tuple(name: str, value, ndim: int, minimum: int = 1) -> tuple[int, ...]:
    """An int or a length-`ndim` sequence of ints, each >= `minimum`, as a tuple."""
    values = (value,) * ndim if _is_int(value) else value
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != ndim:
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}")
    if not all(_is_int(v) for v in values):
        raise TypeError(f"{name} must contain ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in values)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _explicit_padding(padding, ndim: int) -> Pairs:
    """int | (p, ...) | ((lo, hi), ...) -> ((lo, hi), ...)."""
    if _is_int(padding):
        return ((int(padding), int(padding)),) * ndim
    if isinstance(padding, Sequence) and len(padding) == ndim:
        if all(_is_int(p) for p in padding):
            return tuple((int(p), int(p)) for p in padding)
        if all(isinstance(p, Sequence) and len(p) == 2 and all(_is_int(q) for q in p) for p in padding):
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
    kernel,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    layout: str = "NHWC",
    padding_mode: str = "zeros",
    in_spatial: Sequence[int] | None = None,
) -> Geometry:
    """Validates user arguments and resolves them into a :class:`Geometry`.

    `in_spatial` (the input's spatial shape) is needed only to resolve "SAME"
    padding and to check that the kernel fits the padded input.
    """
    if ndim not in (1, 2, 3):
        raise ValueError(f"only 1, 2 or 3 spatial dimensions are supported, got {ndim}")
    if not isinstance(layout, str) or layout.upper() not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups!r}")
    kernel = int_tuple("kernel size", kernel, ndim)
    stride = int_tuple("stride", stride, ndim)
    dilation = int_tuple("dilation", dilation, ndim)

    if isinstance(padding, str):
        if padding.upper() == "VALID":
            pads = ((0, 0),) * ndim
        elif padding.upper() == "SAME":
            if in_spatial is None:
                raise ValueError("padding='SAME' needs the input's spatial shape (in_spatial)")
            pads = same_padding(in_spatial, kernel, stride, dilation)
        else:
            raise ValueError(f"padding must be an int, a sequence, 'SAME' or 'VALID'; got {padding!r}")
    else:
        pads = _explicit_padding(padding, ndim)

    geometry = Geometry(kernel, stride, pads, dilation, int(groups), layout.upper(), padding_mode)
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
