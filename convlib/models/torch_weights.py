"""Weights from PyTorch: :func:`load_torch_state_dict` copies a `state_dict` into a convlib model.

A `state_dict` is read as plain arrays (NumPy arrays, or anything with `.numpy()` or `__array__`, such as CPU
tensors); torch itself is never imported. Each PyTorch key names one variable of the model:

- ResNet (:class:`~convlib.models.ResNet`, CIFAR and ImageNet presets): torchvision's names, `conv1`, `bn1`,
  `layer{1..}.{j}.conv{k}` / `.bn{k}`, `layer{..}.{j}.downsample.0` / `.1`, `fc`.
- VGG: torchvision's `features.N` (one index per conv, BatchNorm, ReLU and max-pool, in order) and
  `classifier.0` / `.3` / `.6`.
- LeNet-5 (:class:`~convlib.models.LeNet5Modern`) and AlexNet: the convlib attribute paths, `conv1`, `conv2`,
  `fc1`, `fc2`, `fc3` and `conv1` ... `conv5`, `classifier.fc1` ... `classifier.fc3` (a PyTorch module with
  those attribute names loads; AlexNet's conv2, conv4 and conv5 are `nn.Conv2d(..., groups=2)`).

Conversions: conv weights (C_out, C_in / groups, kH, kW) to the layer's layout (HWIO for "NHWC"); linear weights
(out, in) to (in, out); the first dense layer after a feature map larger than 1x1 gets its rows permuted from
PyTorch's (C, H, W) flatten order to convlib's (H, W, C); BatchNorm `weight`, `bias`, `running_mean`,
`running_var` to `scale`, `bias`, `mean`, `var` (`num_batches_tracked` is ignored).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convlib import nn, ops
from convlib.models.alexnet import AlexNet
from convlib.models.lenet import LeNet5Modern
from convlib.models.resnet import ProjectionShortcut, ResNet
from convlib.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where one PyTorch array goes: the variable, the array's shape in PyTorch, and its conversion; `subtract`:
    the array is subtracted from the variable once the others are copied (a conv bias folded into BatchNorm)."""

    variable: nnx.Variable
    torch_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = lambda a: a
    subtract: bool = False


Targets = dict[str, _Target | None]  # None: a key that is accepted and ignored


def _vector(variable: nnx.Variable) -> _Target:
    return _Target(variable, tuple(variable.shape))


def _conv(prefix: str, layer: nn.Conv) -> Targets:
    """(C_out, C_in / groups, *K) -> the layer's kernel layout."""
    axes = ops.layout_axes(layer.layout, layer.ndim)
    order = (axes.kernel_out, axes.kernel_in, *axes.kernel_spatial)  # the kernel's axis for each PyTorch axis
    shape = layer.kernel.shape
    targets = {
        f"{prefix}.weight": _Target(
            layer.kernel, tuple(shape[a] for a in order), lambda w: np.transpose(w, np.argsort(order))
        )
    }
    if layer.bias is not None:
        targets[f"{prefix}.bias"] = _vector(layer.bias)
    return targets


def _linear(prefix: str, layer: nnx.Linear, channels: int | None = None) -> Targets:
    """(out, in) -> (in, out); with `channels`, the inputs are a flattened (C, H, W) map (square) in PyTorch and
    (H, W, C) in convlib, so the columns are permuted."""
    features, out = layer.kernel.shape
    side = math.isqrt(features // channels) if channels else 1

    def convert(w):
        w = w.reshape(out, channels, side, side).transpose(0, 2, 3, 1) if side > 1 else w
        return w.reshape(out, features).T

    targets = {f"{prefix}.weight": _Target(layer.kernel, (out, features), convert)}
    if layer.bias is not None:
        targets[f"{prefix}.bias"] = _vector(layer.bias)
    return targets


def _batch_norm(prefix: str, layer: nnx.BatchNorm) -> Targets:
    return {
        f"{prefix}.weight": _vector(layer.scale),
        f"{prefix}.bias": _vector(layer.bias),
        f"{prefix}.running_mean": _vector(layer.mean),
        f"{prefix}.running_var": _vector(layer.var),
        f"{prefix}.num_batches_tracked": None,
    }


def _lenet5_modern(model: LeNet5Modern) -> Targets:
    return (
        _conv("conv1", model.conv1)
        | _conv("conv2", model.conv2)
        | _linear("fc1", model.fc1, model.conv2.out_features)
        | _linear("fc2", model.fc2)
        | _linear("fc3", model.fc3)
    )


def _alexnet(model: AlexNet) -> Targets:
    convs = (model.conv1, model.conv2, model.conv3, model.conv4, model.conv5)
    targets = {key: t for i, conv in enumerate(convs, 1) for key, t in _conv(f"conv{i}", conv).items()}
    head = model.classifier
    return (
        targets
        | _linear("classifier.fc1", head.fc1, model.conv5.out_features)
        | _linear("classifier.fc2", head.fc2)
        | _linear("classifier.fc3", head.fc3)
    )


def _vgg(model: VGG) -> Targets:
    """torchvision's `features` Sequential: conv, [BatchNorm,] ReLU per conv, a max-pool per block.

    torchvision's convs before BatchNorm have a bias b; convlib's have none: BN(conv + b) is BN(conv) with the
    running mean lowered by b (in training the batch mean absorbs b), so b is subtracted from the running mean.
    """
    targets, index = {}, 0
    for block in model.blocks:
        for i, conv in enumerate(block.convs):
            targets |= _conv(f"features.{index}", conv)
            if block.norms is not None:
                norm = block.norms[i]
                targets[f"features.{index}.bias"] = _Target(norm.mean, tuple(norm.mean.shape), subtract=True)
                index += 1
                targets |= _batch_norm(f"features.{index}", norm)
            index += 2  # and the ReLU
        index += 1  # the max-pool
    head = model.classifier
    channels = model.blocks[-1].convs[-1].out_features
    return (
        targets
        | _linear("classifier.0", head.fc1, channels)
        | _linear("classifier.3", head.fc2)
        | _linear("classifier.6", head.fc3)
    )


def _resnet(model: ResNet) -> Targets:
    """torchvision's names; a bottleneck's conv3/bn3 only where the block has them."""
    stem = model.stem.layers
    targets = _conv("conv1", stem[0]) | _batch_norm("bn1", stem[1])
    for i, stage in enumerate(model.stages, 1):
        for j, block in enumerate(stage.layers):
            prefix = f"layer{i}.{j}"
            for k in (1, 2, 3):
                if hasattr(block, f"conv{k}"):
                    targets |= _conv(f"{prefix}.conv{k}", getattr(block, f"conv{k}"))
                    targets |= _batch_norm(f"{prefix}.bn{k}", getattr(block, f"norm{k}"))
            if isinstance(block.shortcut, ProjectionShortcut):
                targets |= _conv(f"{prefix}.downsample.0", block.shortcut.conv)
                targets |= _batch_norm(f"{prefix}.downsample.1", block.shortcut.norm)
    return targets | _linear("fc", model.fc)


MAPPINGS: dict[type, Callable[[nnx.Module], Targets]] = {
    LeNet5Modern: _lenet5_modern,
    AlexNet: _alexnet,
    VGG: _vgg,
    ResNet: _resnet,
}


def _as_array(value) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, object]) -> nnx.Module:
    """Copies a PyTorch `state_dict` into `model` (in place) and returns the model.

    Every key must name a variable of the model and every variable must be given (see the module docstring for
    the names), with the shape PyTorch gives it; otherwise ValueError names the key and nothing is copied.
    Arrays are cast to the model's parameter dtypes.

    >>> import numpy as np
    >>> from flax import nnx
    >>> from convlib import models
    >>> model = models.create("lenet5_modern", in_channels=1, input_size=28, rngs=nnx.Rngs(0))
    >>> state = {k: np.zeros(s, np.float32) for k, s in torch_shapes(model).items()}
    >>> load_torch_state_dict(model, state).fc1.kernel.shape  # PyTorch's fc1.weight is (120, 400)
    (400, 120)
    """
    targets = _targets(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    for key in sorted(state_dict, key=str):
        if key not in targets:
            raise ValueError(f"state_dict key {key!r} names no variable of {type(model).__name__}")
    missing = [key for key, target in targets.items() if target is not None and key not in state_dict]
    if missing:
        raise ValueError(f"state_dict has no key {missing[0]!r} ({len(missing)} missing) for {type(model).__name__}")
    arrays = {}
    for key, value in state_dict.items():
        if targets[key] is None:
            continue
        array = _as_array(value)
        if array.shape != targets[key].torch_shape:
            raise ValueError(
                f"state_dict key {key!r} has shape {array.shape}; {type(model).__name__} expects "
                f"{targets[key].torch_shape}"
            )
        arrays[key] = array
    for subtract in (False, True):
        for key, array in arrays.items():
            target = targets[key]
            if target.subtract == subtract:
                value = target.variable[...] - array if subtract else target.convert(array)
                target.variable.set_value(jnp.asarray(value, target.variable.dtype))
    return model


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The PyTorch key and shape of each array :func:`load_torch_state_dict` needs for `model`.

    >>> from flax import nnx
    >>> from convlib import models
    >>> torch_shapes(models.create("resnet20", rngs=nnx.Rngs(0)))["layer2.0.conv1.weight"]
    (32, 16, 3, 3)
    """
    return {key: target.torch_shape for key, target in _targets(model).items() if target is not None}


def _targets(model) -> Targets:
    for kind, mapping in MAPPINGS.items():
        if isinstance(model, kind):
            return mapping(model)
    names = ", ".join(kind.__name__ for kind in MAPPINGS)
    raise TypeError(f"model must be one of {names} to load PyTorch weights, got {type(model).__name__}")
