"""`set_backward`: switch the backward mode of every convlib conv and pool in a built model."""

from __future__ import annotations

from flax import nnx

from convlib.nn.conv import Conv
from convlib.nn.pool import AvgPool, GlobalAvgPool, MaxPool
from convlib.nn.validation import check_backward

LAYERS = (Conv, MaxPool, AvgPool, GlobalAvgPool)
"""The layers that take `backward=`."""


def set_backward(model: nnx.Module, backward: str) -> nnx.Module:
    """Sets `backward` ("custom", "textbook", "autodiff" or "composable") on every convlib conv and pool in
    `model`, in place, and returns `model`: one call instead of rebuilding it (its parameters are kept).

    >>> from flax import nnx
    >>> from convlib import nn
    >>> model = nnx.Sequential(nn.Conv(1, 2, 3, rngs=nnx.Rngs(0)), nn.MaxPool(2))
    >>> [layer.backward for layer in set_backward(model, "composable").layers]
    ['composable', 'composable']
    """
    backward = check_backward(backward)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LAYERS):
            module.backward = backward
    return model
