"""How closely two results agree: max absolute and max relative error over pytrees of arrays."""

from __future__ import annotations

import jax
import numpy as np


def errors(a, b) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|) over all leaves of two pytrees (b is the reference), in float64 NumPy.

    The relative error is normwise (scaled by the reference's largest magnitude), so entries near zero do not blow
    it up; with an all-zero reference it is the absolute error.
    """
    diffs, scales = [], []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diffs.append(np.max(np.abs(x - y), initial=0.0))
        scales.append(np.max(np.abs(y), initial=0.0))
    diff, scale = max(diffs), max(scales)
    return float(diff), float(diff / scale) if scale else float(diff)
