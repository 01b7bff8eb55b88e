"""Local response normalisation (Krizhevsky, Sutskever and Hinton 2012, Section 3.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from convlib import ops
from convlib.nn.validation import check_float, check_layout, check_positive_int


class LocalResponseNorm(nnx.Module):
    """Normalises each activity by the energy of its neighbouring channels at the same position.

        b[c] = a[c] / (k + alpha * sum_{c'=max(0, c - n//2)}^{min(C-1, c + (n-1)//2)} a[c']^2) ** beta

    This is the paper's convention: `alpha` multiplies the plain sum (PyTorch's
    `LocalResponseNorm` multiplies by `alpha / n` instead, so PyTorch's alpha is
    n times ours). Defaults are AlexNet's: n = 5, k = 2, alpha = 1e-4, beta = 0.75.
    For odd n the window is centred (n//2 each side, as in the paper).

    Shapes: x (N, *S, C) for "NHWC", (N, C, *S) for "NCHW"; the output has x's shape and dtype.
    """

    def __init__(self, size: int = 5, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, layout: str = "NHWC"):
        self.size = check_positive_int("size", size)
        self.alpha, self.beta = check_float("alpha", alpha, minimum=0.0), check_float("beta", beta, minimum=0.0)
        self.k = check_float("k", k, minimum=0.0, open_minimum=True)
        self.layout = check_layout(layout)

    def __call__(self, x: jax.Array) -> jax.Array:
        axis = ops.layout_axes(self.layout, x.ndim - 2).channel
        window, pads = [1] * x.ndim, [(0, 0)] * x.ndim
        window[axis], pads[axis] = self.size, (self.size // 2, (self.size - 1) // 2)
        energy = lax.reduce_window(jnp.square(x), 0.0, lax.add, window, (1,) * x.ndim, pads)
        return x / (self.k + self.alpha * energy) ** self.beta
