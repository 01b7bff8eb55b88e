"""Pure functions: convolution and pooling with hand-derived backward passes.

Imports jax and numpy only; usable on its own.
"""

from convlib.ops.conv import BACKWARDS, conv, conv_transpose, convolve
from convlib.ops.geometry import Geometry, make_geometry
from convlib.ops.pool import avg_pool, max_pool

__all__ = [
    "BACKWARDS",
    "Geometry",
    "avg_pool",
    "conv",
    "conv_transpose",
    "convolve",
    "make_geometry",
    "max_pool",
]
