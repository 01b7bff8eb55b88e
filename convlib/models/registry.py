"""Build any model by name: `create(name, ...)`; `available()` lists the names."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from convlib.models import alexnet, context, lenet, resnet, vgg


def _vgg_builders():
    builders = {}
    for depth in (11, 13, 16, 19):
        for batch_norm in (False, True):
            name = f"vgg{depth}" + ("_bn" if batch_norm else "")
            builders[name] = functools.partial(vgg.VGG, depth=depth, batch_norm=batch_norm)
            builders[name + "_small"] = functools.partial(vgg.VGG, depth=depth, batch_norm=batch_norm, **vgg.SMALL)
    return builders


def _context(size):
    def build(*, num_classes, in_channels=None, **options):
        if in_channels is not None and in_channels != num_classes:
            raise ValueError(
                f"the context module maps C feature maps to C (C = num_classes = {num_classes}); "
                f"in_channels must equal num_classes or be left out, got {in_channels}"
            )
        return context.ContextModule(channels=num_classes, size=size, **options)

    return build


_BUILDERS = {
    "lenet5": lenet.LeNet5,
    "lenet5_modern": lenet.LeNet5Modern,
    "alexnet": alexnet.AlexNet,
    "alexnet_small": functools.partial(alexnet.AlexNet, **alexnet.SMALL),
    **_vgg_builders(),
    **{f"resnet{d}": functools.partial(resnet.CifarResNet, depth=d) for d in (20, 32, 44, 56, 110)},
    **{f"plain{d}": functools.partial(resnet.CifarResNet, depth=d, residual=False) for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": functools.partial(resnet.ImageNetResNet, depth=d) for d in resnet.IMAGENET_DEPTHS},
    "context_basic": _context("basic"),
    "context_large": _context("large"),
}


def available() -> tuple[str, ...]:
    """The names `create` accepts, sorted."""
    return tuple(sorted(_BUILDERS))


def create(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int | None = None,
    rngs: nnx.Rngs,
    backward: str = "custom",
    dtype=None,
    param_dtype=jnp.float32,
    **options,
) -> nnx.Module:
    """Builds the model `name` (see :func:`available`); it is called as `model(x)`, x (N, H, W, C) float.

    Args:
      num_classes: outputs (for the context modules, C: the maps in and out).
      in_channels: input channels; None: 3 (for the context modules, num_classes).
      rngs: `nnx.Rngs(params=..., dropout=...)` (or one seed for both).
      backward: "custom", "textbook" or "autodiff", for every conv and pool.
      dtype, param_dtype: compute and parameter dtypes of every layer.
      **options: the model's own keyword arguments (e.g. `input_size`, `head`,
        `activation`, `config`, `widths`, `shortcut`); see its class.
    The model starts in training mode; `model.eval()` / `model.train()` switch BatchNorm and Dropout.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    if in_channels is not None:
        options["in_channels"] = in_channels
    return _BUILDERS[name](
        num_classes=num_classes, rngs=rngs, backward=backward, dtype=dtype, param_dtype=param_dtype, **options
    )
