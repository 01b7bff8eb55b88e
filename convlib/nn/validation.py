"""What the layers check when they are built; errors name the parameter and the value.

The ops arguments (stride, padding, dilation, groups, layout, padding_mode, backward) are checked by the ops
boundary's own functions, called once here so that a bad layer fails when it is built, not at its first call.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from flax import nnx

from convlib import ops
from convlib.ops.checks import ArgumentTypeError, check_bool, check_choice, check_float, check_floating_dtype, check_int
from convlib.ops.geometry import check_backward, check_layout

__all__ = [
    "check_axis_name",
    "check_backward",
    "check_bool",
    "check_choice",
    "check_float",
    "check_floating_dtype",
    "check_layout",
    "check_positive_int",
    "check_rngs",
    "layer_geometry",
    "layer_ndim",
]


def check_positive_int(name: str, value) -> int:
    """`value` as an int >= 1 (a count or a size)."""
    return check_int(name, value, minimum=1)


def check_rngs(rngs) -> nnx.Rngs:
    """`rngs` if it is an `nnx.Rngs` (e.g. `nnx.Rngs(0)` or `nnx.Rngs(params=0, dropout=1)`)."""
    if not isinstance(rngs, nnx.Rngs):
        raise ArgumentTypeError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {rngs!r}")
    return rngs


def check_axis_name(name: str, value) -> str | None:
    """`value` if it is None or a non-empty str (a mesh axis name)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ArgumentTypeError(f"{name} must be None or a mesh axis name (a non-empty str), got {value!r}")
    return value


def layer_ndim(name: str, size, ndim) -> int:
    """Spatial dims of a layer whose kernel or window is `size`: its length if it is a tuple, else `ndim` (default 2).

    Checks that `size` is a positive int or a sequence of 1, 2 or 3 positive ints, naming the layer's parameter.
    """
    if ndim is not None and ndim not in (1, 2, 3):
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim!r}")
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        check_positive_int(name, size)
        return 2 if ndim is None else ndim
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) not in (1, 2, 3):
        raise ValueError(f"{name} must be an int or a sequence of 1, 2 or 3 ints, got {size!r}")
    for entry in size:
        check_positive_int(name, entry)
    if ndim is not None and ndim != len(size):
        raise ValueError(f"{name}={size!r} has {len(size)} entries but ndim={ndim}")
    return len(size)


def layer_geometry(ndim: int, size, *, padding, **arguments) -> ops.Geometry:
    """:func:`convlib.ops.make_geometry` of a layer's arguments, run once when the layer is built.

    "SAME" padding depends on the input size, so it is resolved at each call; here it stands in as "VALID".
    """
    same = isinstance(padding, str) and padding.upper() == "SAME"
    return ops.make_geometry(ndim, size, padding="VALID" if same else padding, **arguments)
