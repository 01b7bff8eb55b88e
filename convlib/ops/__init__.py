"""Pure functions: convolution and pooling with hand-derived backward passes.

Imports jax and numpy only; usable on its own. Its modules form one chain, each using only those before it:
checks -> geometry -> formulation, windows -> textbook -> fast_forward, fast_backward -> plan -> conv; pool,
reference and receptive_field beside conv; compiler (the XLA compile options) stands alone.
"""

from convlib.ops.compiler import compiler_options
from convlib.ops.conv import conv, conv_transpose, convolve
from convlib.ops.geometry import BACKWARDS, Geometry, LayoutAxes, layout_axes, make_geometry
from convlib.ops.pool import avg_pool, max_pool
from convlib.ops.receptive_field import ReceptiveField, receptive_field, receptive_fields
from convlib.ops.reference import IMPLEMENTATIONS, conv_by, conv_im2col, conv_lax, conv_loops

__all__ = [
    "BACKWARDS",
    "IMPLEMENTATIONS",
    "Geometry",
    "LayoutAxes",
    "ReceptiveField",
    "avg_pool",
    "compiler_options",
    "conv",
    "conv_by",
    "conv_im2col",
    "conv_lax",
    "conv_loops",
    "conv_transpose",
    "convolve",
    "layout_axes",
    "make_geometry",
    "max_pool",
    "receptive_field",
    "receptive_fields",
]
