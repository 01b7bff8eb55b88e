"""Receptive-field arithmetic for stacks of convolution and pooling layers.

For layer l with dilated kernel extent `K_eff`, stride `s` and low padding `lo`,
measured in input pixels (Araujo et al. 2019; the lecture's Q1/Q2):

    size_l  = size_{l-1} + (K_eff - 1) * jump_{l-1}
    jump_l  = jump_{l-1} * s
    start_l = start_{l-1} + ((K_eff - 1) / 2 - lo) * jump_{l-1}

`size` is how many input pixels one unit sees, `jump` the distance in input
pixels between neighbouring units, `start` the input coordinate of the centre
of the first unit's field (pixel centres at 0, 1, 2, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from convlib.ops.geometry import Geometry


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer's units, one entry per spatial dim."""

    size: tuple[int, ...]
    jump: tuple[int, ...]
    start: tuple[float, ...]


def receptive_fields(layers: Sequence[Geometry]) -> list[ReceptiveField]:
    """The receptive field after each layer of a stack (the input itself excluded).

    Args:
      layers: the :class:`Geometry` of each layer, input side first, all with the same `ndim` — built by
        :func:`make_geometry` (a conv's or a pool's kernel, stride, padding and dilation); nothing else is accepted.

    >>> from convlib.ops import make_geometry
    >>> conv3 = make_geometry(2, 3, padding=1)
    >>> [f.size for f in receptive_fields([conv3, conv3, make_geometry(2, 2, stride=2)])]
    [(3, 3), (5, 5), (6, 6)]
    >>> receptive_field([make_geometry(2, 3, dilation=d, padding=d) for d in (1, 2, 4)]).size
    (15, 15)
    """
    if isinstance(layers, Geometry) or not isinstance(layers, Sequence) or isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of ops.Geometry (see make_geometry), got {layers!r}")
    if not layers:
        raise ValueError("layers must hold at least one Geometry, got an empty sequence")
    for index, layer in enumerate(layers):
        if not isinstance(layer, Geometry):
            raise TypeError(f"layers[{index}] must be an ops.Geometry (see make_geometry), got {layer!r}")
    ndim = layers[0].ndim
    size, jump, start = (1,) * ndim, (1,) * ndim, (0.0,) * ndim
    fields = []
    for index, layer in enumerate(layers):
        if layer.ndim != ndim:
            raise ValueError(f"layers[{index}] must be a Geometry with {ndim} spatial dims, got {layer!r}")
        start = tuple(
            t + ((k - 1) / 2 - lo) * j for t, k, (lo, _), j in zip(start, layer.effective_kernel, layer.padding, jump)
        )
        size = tuple(r + (k - 1) * j for r, k, j in zip(size, layer.effective_kernel, jump))
        jump = tuple(j * s for j, s in zip(jump, layer.stride))
        fields.append(ReceptiveField(size, jump, start))
    return fields


def receptive_field(layers: Sequence[Geometry]) -> ReceptiveField:
    """The receptive field of the last layer of a stack: `receptive_fields(layers)[-1]`."""
    return receptive_fields(layers)[-1]
