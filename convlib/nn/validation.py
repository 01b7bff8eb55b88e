"""Constructor-argument checks shared by the layers; errors name the parameter and the value."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from convlib import ops


def check_positive_int(name: str, value) -> int:
    """`value` as an int, or ValueError unless it is an int >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_backward(backward) -> str:
    return check_choice("backward", backward, ops.BACKWARDS)


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout.upper() not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    return layout.upper()


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
