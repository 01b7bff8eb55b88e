"""Build any model by name: `create(name, ...)`; `available()` lists the names."""

from __future__ import annotations

import functools
import inspect

import jax.numpy as jnp
from flax import nnx

from convlib.models import alexnet, context, lenet, resnet, vgg
from convlib.ops.checks import ArgumentTypeError


def _vgg_builders():
    builders = {}
    for depth in (11, 13, 16, 19):
        for batch_norm in (False, True):
            name = f"vgg{depth}" + ("_bn" if batch_norm else "")
            builders[name] = functools.partial(vgg.VGG, depth=depth, batch_norm=batch_norm)
            builders[name + "_small"] = functools.partial(vgg.VGG, depth=depth, batch_norm=batch_norm, **vgg.SMALL)
    return builders


def _context_module(*, size, num_classes, in_channels=None, init="identity", init_noise=1e-3, **common):
    if in_channels is not None and in_channels != num_classes:
        raise ValueError(
            f"the context module maps C feature maps to C (C = num_classes = {num_classes}); "
            f"in_channels must equal num_classes or be left out, got {in_channels}"
        )
    return context.ContextModule(channels=num_classes, size=size, init=init, init_noise=init_noise, **common)


_BUILDERS = {
    "lenet5": lenet.LeNet5,
    "lenet5_modern": lenet.LeNet5Modern,
    "alexnet": alexnet.AlexNet,
    "alexnet_small": functools.partial(alexnet.AlexNet, **alexnet.SMALL),
    **_vgg_builders(),
    **{f"resnet{d}": functools.partial(resnet.CifarResNet, depth=d) for d in (20, 32, 44, 56, 110)},
    **{f"plain{d}": functools.partial(resnet.CifarResNet, depth=d, residual=False) for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": functools.partial(resnet.ImageNetResNet, depth=d) for d in resnet.IMAGENET_DEPTHS},
    "context_basic": functools.partial(_context_module, size="basic"),
    "context_large": functools.partial(_context_module, size="large"),
}


def available() -> tuple[str, ...]:
    """The names `create` accepts, sorted."""
    return tuple(sorted(_BUILDERS))


def accepted_options(name: str) -> tuple[str, ...]:
    """The model-specific keyword arguments `create(name, ...)` accepts (beyond the common ones), sorted; those the
    name presets (e.g. `depth` of "resnet20") may be overridden too.

    >>> accepted_options("lenet5_modern")
    ('activation', 'channels', 'hidden', 'input_size', 'pool')
    """
    return tuple(sorted(_keywords(_BUILDERS[_checked_name(name)]) - COMMON_OPTIONS))


COMMON_OPTIONS = frozenset({"num_classes", "in_channels", "rngs", "backward", "dtype", "param_dtype"})


def _keywords(builder) -> set[str]:
    """The keyword parameters of a model class or a preset (or a partial of one)."""
    function = builder.func if isinstance(builder, functools.partial) else builder
    if inspect.isclass(function):  # NNX modules hide their __init__ signature behind a metaclass
        function = function.__init__
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self"}


def _checked_name(name) -> str:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return name


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
      backward: a mode of `convlib.ops.BACKWARDS` (e.g. "custom", "autodiff"), for every conv and pool.
      dtype, param_dtype: compute and parameter dtypes of every layer.
      **options: the model's own keyword arguments (e.g. `input_size`, `head`,
        `activation`, `config`, `widths`, `shortcut`); see its class.
    The model starts in training mode; `model.eval()` / `model.train()` switch BatchNorm and Dropout.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = create("lenet5_modern", in_channels=1, input_size=28, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
    >>> create("resnet20", rngs=nnx.Rngs(0), backward="autodiff").fc.kernel.shape
    (64, 10)
    """
    accepted = accepted_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ArgumentTypeError(f"unknown option {unknown[0]!r} for {name}; its options: {', '.join(accepted)}")
    if in_channels is not None:
        options["in_channels"] = in_channels
    return _BUILDERS[name](
        num_classes=num_classes, rngs=rngs, backward=backward, dtype=dtype, param_dtype=param_dtype, **options
    )
