"""Faster formulations of the forward sum: the same products as :func:`convlib.ops.textbook.forward`, plus products
with zero, in shapes a CPU conv library runs faster.

Space-to-depth (few channels, stride 1): a conv with C_in = 1 or 3 channels runs far below a CPU's speed, since
each output reads a long, thin patch. Cutting the input into 2x2 blocks and stacking each block's four pixels as
channels (`H x W x C -> H/2 x W/2 x 4C`) turns a `K x K` kernel into a `ceil((K + 1) / 2)`-square kernel over 4C
channels whose 4 * C_out outputs are the four output pixels of a block: output pixel `(2i + a, 2j + b)` reads
block rows from `i`, with the kernel shifted by `(a, b)` inside a zero kernel of side `2 ceil((K + 1) / 2)`:

    Y[2i + a, 2j + b, o] = sum_{p, q, c} Xs[i + p, j + q, (u, v, c)] Ws[p, q, (u, v, c), (a, b, o)],
    Ws[p, q, (u, v, c), (a, b, o)] = W[2p + u - a, 2q + v - b, c, o]  (0 outside the kernel)

Every product of the textbook sum appears once; the others are products with zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from convlib.ops.geometry import Geometry


def forward_by_space_to_depth(geometry: Geometry, x, w, b, *, block: int):
    """Y = X (*) W + b for a 2-D, stride-1, undilated, ungrouped NHWC conv, by space-to-depth (module docstring).

    x: (N, H, W, C_in); w: (K_h, K_w, C_in, C_out); b: (C_out,) or None. Returns (N, H_out, W_out, C_out).

    >>> import jax, jax.numpy as jnp
    >>> from convlib.ops import textbook
    >>> from convlib.ops.geometry import make_geometry
    >>> x, w = jax.random.normal(jax.random.key(0), (2, 9, 9, 1)), jax.random.normal(jax.random.key(1), (5, 5, 1, 6))
    >>> g = make_geometry(2, (5, 5), padding=1)
    >>> y = forward_by_space_to_depth(g, x, w, None, block=2)
    >>> y.shape, bool(jnp.allclose(y, textbook.forward(g, x, w, None), atol=1e-5))
    ((2, 7, 7, 6), True)
    """
    n, c_out = x.shape[0], w.shape[-1]
    out = geometry.output_spatial(x.shape[1:3])
    kernel = block_kernel(geometry.kernel, block)
    xs = input_in_blocks(x, geometry, block)
    ws = jnp.concatenate(
        [_shifted_block_kernel(w, kernel, a, bb, block) for a in range(block) for bb in range(block)], axis=-1
    )
    y = lax.conv_general_dilated(xs, ws, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    blocks = y.shape[1:3]
    y = y.reshape(n, *blocks, block, block, c_out).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(n, block * blocks[0], block * blocks[1], c_out)[:, : out[0], : out[1]]
    return y if b is None else y + b


def block_kernel(kernel, block: int) -> tuple[int, ...]:
    """The block kernel's side per spatial dim, `ceil((K + block - 1) / block)`: the blocks one output block reads."""
    return tuple((k + block - 2) // block + 1 for k in kernel)


def input_in_blocks(x, geometry: Geometry, block: int):
    """(N, H, W, C) padded by the conv's padding, then with zeros up to the whole blocks the outputs read (or
    cropped of rows no output reads), as blocks: (N, h, w, B² C) (:func:`_to_blocks`)."""
    out = geometry.output_spatial(x.shape[1:3])
    cells = tuple(-(-o // block) + k - 1 for o, k in zip(out, block_kernel(geometry.kernel, block)))
    widths = [(lo, block * m - h - lo, 0) for (lo, _), m, h in zip(geometry.padding, cells, x.shape[1:3])]
    return _to_blocks(lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *widths, (0, 0, 0)]), cells, block)


def _to_blocks(x, cells, block: int):
    """(N, B h, B w, C) -> (N, h, w, B² C), each block's pixels (row u, column v) stacked as channels (u, v, c)."""
    c = x.shape[-1]
    x = x.reshape(x.shape[0], cells[0], block, cells[1], block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(x.shape[0], *cells, block * block * c)


def _shifted_block_kernel(w, kernel, a: int, b: int, block: int):
    """The block kernel (k_h, k_w, B² C_in, C_out) of output phase (a, b): `w` placed at offset (a, b) in a zero
    kernel of side B k, cut into BxB blocks like the input."""
    k_h, k_w, c, o = w.shape
    placed = jnp.zeros((block * kernel[0], block * kernel[1], c, o), w.dtype).at[a : a + k_h, b : b + k_w].set(w)
    placed = placed.reshape(kernel[0], block, kernel[1], block, c, o).transpose(0, 2, 1, 3, 4, 5)
    return placed.reshape(*kernel, block * block * c, o)
