"""Stage-by-stage forward passes of lenet5_modern and the CIFAR ResNets / plain nets, and the receptive field of
each stage's units (from the convs and pools on the longest path through the stage)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from convlib import models, nn, ops


@dataclasses.dataclass
class Stage:
    """name; apply: the previous stage's output -> this stage's output; path: its conv and pool layers in order."""

    name: str
    apply: Callable
    path: list


def stages(model) -> list[Stage]:
    """The stages of `model`: lenet5_modern (conv-act-pool twice) or a CifarResNet (stem, then its 3 stages)."""
    if isinstance(model, models.LeNet5Modern):
        act = jax.nn.relu if model.activation == "relu" else jnp.tanh
        return [
            Stage("conv1-pool1", lambda x: model.pool1(act(model.conv1(x))), [model.conv1, model.pool1]),
            Stage("conv2-pool2", lambda x: model.pool2(act(model.conv2(x))), [model.conv2, model.pool2]),
        ]
    if isinstance(model, models.CifarResNet):
        found = [Stage("stem", model.stem, [model.stem.layers[0]])]
        for i, stage in enumerate(model.stages):
            path = [conv for block in stage.layers for conv in (block.conv1, block.conv2)]
            found.append(Stage(f"stage {i + 1}", stage, path))
        return found
    raise ValueError(f"model must be a LeNet5Modern or a CifarResNet, got {type(model).__name__}")


def features(model, x) -> list[tuple[str, jax.Array]]:
    """[(stage name, its output (N, H, W, C))] for images x (N, H, W, C_in)."""
    maps = []
    for stage in stages(model):
        x = stage.apply(x)
        maps.append((stage.name, x))
    return maps


def geometry(layer) -> ops.Geometry:
    """The ops Geometry of an nn.Conv or a pooling layer (explicit padding)."""
    if isinstance(layer, nn.Conv):
        return ops.make_geometry(
            layer.ndim, layer.kernel_size, stride=layer.stride, padding=layer.padding, dilation=layer.dilation
        )
    return ops.make_geometry(layer.ndim, layer.window, stride=layer.stride, padding=layer.padding)


def stage_fields(model) -> list[ops.ReceptiveField]:
    """The receptive field (in input pixels) of the units of each stage's output."""
    path, ends = [], []
    for stage in stages(model):
        path += [geometry(layer) for layer in stage.path]
        ends.append(len(path) - 1)
    fields = ops.receptive_fields(path)
    return [fields[i] for i in ends]
