"""Reshapes between the conv part of a network and its fully connected head."""

from __future__ import annotations

import math

import jax


def flatten(x: jax.Array) -> jax.Array:
    """(N, ...) -> (N, prod(...)): one row per example; also for an empty batch (N = 0), where
    `x.reshape(N, -1)` cannot infer the row length.

    >>> import jax.numpy as jnp
    >>> flatten(jnp.zeros((0, 5, 5, 16))).shape
    (0, 400)
    """
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))
