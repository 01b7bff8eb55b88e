"""Constructor-argument checks shared by the layers; errors name the parameter and the value."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from convlib.ops.checks import check_choice
from convlib.ops.geometry import check_backward, check_layout

__all__ = [
    "check_backward",
    "check_choice",
    "check_layout",
    "check_padding_string",
    "check_positive_int",
    "spatial_ndim",
]


def check_positive_int(name: str, value) -> int:
    """`value` as an int, or ValueError unless it is an int >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def spatial_ndim(name: str, size, ndim) -> int:
    """Spatial dims of a layer: the length of `size` if it is a tuple, else `ndim` (default 2).

    Checks that `size` is a positive int or a sequence of 1, 2 or 3 positive ints.
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


def check_padding_string(padding) -> None:
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"padding must be an int, a sequence, 'SAME' or 'VALID'; got {padding!r}")
