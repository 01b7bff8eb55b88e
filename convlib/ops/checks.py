"""Argument checks at the API boundary, shared by every floor of convlib.

Each returns the normalised value or raises :class:`ArgumentTypeError` (wrong kind of value) or `ValueError` (right
kind, out of range), naming the parameter and the value. One check per fact: every entry point calls these instead of
its own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class ArgumentTypeError(TypeError, ValueError):
    """A wrong kind of argument: a `TypeError`, and a `ValueError` too, so that code catching `ValueError` for any bad
    argument catches it (as NumPy's `AxisError` is both a `ValueError` and an `IndexError`)."""


def is_int(value) -> bool:
    """An integer that is not a bool (`True` is an `int` in Python, never a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in `[minimum, maximum]` (either bound may be None).

    >>> check_int("epochs", 3, minimum=1)
    3
    """
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}={value!r} is out of range: expected an int {_range(minimum, maximum)}")
    return int(value)


def check_float(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_minimum: bool = False,
    open_maximum: bool = False,
) -> float:
    """`value` (a real number, not a bool) as a finite float in `[minimum, maximum]` (a bound excluded with
    `open_minimum` / `open_maximum`).

    >>> check_float("dropout", 0.5, 0.0, 1.0, open_maximum=True)
    0.5
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if open_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if open_maximum else value > maximum)
    if not math.isfinite(value) or too_low or too_high:
        bound = _range(minimum, maximum, open_minimum=open_minimum, open_maximum=open_maximum)
        bound = " ".join(("a finite number", bound)).strip()
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """`value` if it is a bool (or a NumPy bool); a truthy string such as "False" is refused.

    >>> check_bool("ceil_mode", False)
    False
    """
    if not isinstance(value, bool | np.bool_):
        raise ArgumentTypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """`value` if it is one of the strings `choices`.

    >>> check_choice("backward", "custom", ("custom", "textbook", "autodiff"))
    'custom'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_floating_dtype(name: str, dtype, *, allow_none: bool = False):
    """`dtype` as a `jnp.dtype` if it names a floating dtype JAX knows (None passes with `allow_none`).

    >>> check_floating_dtype("dtype", "bfloat16")
    dtype(bfloat16)
    """
    if dtype is None and allow_none:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or dtype is None or not jnp.issubdtype(resolved, jnp.floating):
        raise ArgumentTypeError(f"{name} must be a floating dtype (e.g. float32, bfloat16), got {dtype!r}")
    return resolved


def check_key(name: str, key):
    """`key` if it is a typed PRNG key array (`jax.random.key(seed)`); raw uint32 keys and seeds are refused.

    >>> import jax
    >>> check_key("key", jax.random.key(0)).shape
    ()
    """
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise ArgumentTypeError(f"{name} must be a typed PRNG key (jax.random.key(seed)), got {key!r}")
    return key


def _range(minimum, maximum, *, open_minimum: bool = False, open_maximum: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if open_minimum else '['}{minimum}, {maximum}{')' if open_maximum else ']'}"
    if minimum is not None:
        return f"{'>' if open_minimum else '>='} {minimum}"
    if maximum is not None:
        return f"{'<' if open_maximum else '<='} {maximum}"
    return ""
