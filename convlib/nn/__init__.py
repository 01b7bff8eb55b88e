"""Flax NNX layers: thin wrappers over :mod:`convlib.ops`.

Every conv and pool layer takes `backward` (any mode of `convlib.ops.BACKWARDS`)
and passes it to the op; :func:`set_backward` switches a whole built model.
"""

from convlib.nn.backward import set_backward
from convlib.nn.conv import Conv, he_normal
from convlib.nn.normalization import LocalResponseNorm
from convlib.nn.pool import AvgPool, GlobalAvgPool, MaxPool
from convlib.nn.reshape import flatten

__all__ = ["AvgPool", "Conv", "GlobalAvgPool", "LocalResponseNorm", "MaxPool", "flatten", "he_normal", "set_backward"]
