"""Pure functions: convolution and pooling with hand-derived backward passes.

Imports jax and numpy only; usable on its own.
"""

from convlib.ops.conv import BACKWARDS, conv, conv_transpose, convolve
from convlib.ops.geometry import Geometry, make_geometry
from convlib.ops.pool import avg_pool, max_pool
from convlib.ops.receptive_field import ReceptiveField, receptive_field, receptive_fields
from convlib.ops.reference import IMPLEMENTATIONS, conv_by, conv_im2col, conv_lax, conv_loops

__all__ = [
    "BACKWARDS",
    "IMPLEMENTATIONS",
    "Geometry",
    "ReceptiveField",
    "avg_pool",
    "conv",
    "conv_by",
    "conv_im2col",
    "conv_lax",
    "conv_loops",
    "conv_transpose",
    "convolve",
    "make_geometry",
    "max_pool",
    "receptive_field",
    "receptive_fields",
]
