"""Residual networks (He, Zhang, Ren and Sun 2016) and their plain twins.

Blocks are conv - BN - ReLU - ... - conv - BN, then (+ shortcut) and ReLU after
the addition. Shortcuts where the shape changes: option "A" (every s-th position,
zero-padded new channels, parameter free) or "B" (1x1 conv with stride + BN).
A plain net (`residual=False`) is the same net without shortcuts; with option A
it has exactly the residual net's parameters. The paper's nets are presets of one
:class:`ResNet`: :data:`CifarResNet` and :data:`ImageNetResNet` (:class:`Preset`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import ops
from convlib.models.layer_factory import LayerFactory
from convlib.nn.validation import check_bool, check_choice, check_positive_int

SHORTCUTS = ("A", "B")
BOTTLENECK_STRIDES = ("1x1", "3x3")
"""Where a bottleneck that downsamples puts its stride: on its first 1x1 conv (the paper) or on its 3x3 conv
(torchvision's ResNet "v1.5")."""


class ZeroPadShortcut(nnx.Module):
    """Option A: x (N, H, W, C_in) -> (N, ceil(H/s), ceil(W/s), C_out), new channels zero; channels first in "NCHW"."""

    def __init__(self, in_features: int, out_features: int, stride: int, layout: str = "NHWC"):
        self.extra, self.stride, self.layout = out_features - in_features, stride, layout

    def __call__(self, x):
        axes = ops.layout_axes(self.layout, x.ndim - 2)
        every_stride = [slice(None)] * x.ndim
        for axis in axes.spatial:
            every_stride[axis] = slice(None, None, self.stride)
        pads = [(0, 0)] * x.ndim
        pads[axes.channel] = (0, self.extra)
        return jnp.pad(x[tuple(every_stride)], pads)


class ProjectionShortcut(nnx.Module):
    """Option B: 1x1 conv with stride, then BatchNorm: (N, H, W, C_in) -> (N, H/s, W/s, C_out)."""

    def __init__(self, in_features: int, out_features: int, stride: int, layers: LayerFactory):
        self.conv = layers.conv(in_features, out_features, 1, stride=stride, use_bias=False)
        self.norm = layers.batch_norm(out_features)

    def __call__(self, x):
        return self.norm(self.conv(x))


class _Block(nnx.Module):
    """What basic and bottleneck blocks share: the shortcut and the join."""

    expansion = 1

    def _init_shortcut(self, in_features, out_features, stride, residual, shortcut, layers):
        self.residual = residual
        if not residual or (in_features == out_features and stride == 1):
            self.shortcut = None  # plain, or identity
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_features, out_features, stride, layers.layout)
        else:
            self.shortcut = ProjectionShortcut(in_features, out_features, stride, layers)

    def _join(self, x, y):
        if self.residual:
            y = y + (x if self.shortcut is None else self.shortcut(x))
        return jax.nn.relu(y)


class BasicBlock(_Block):
    """Two 3x3 convs: (N, H, W, C_in) -> (N, H/stride, W/stride, width)."""

    def __init__(self, in_features, width, stride, *, residual, shortcut, layers: LayerFactory, bottleneck_stride=None):
        self.conv1 = layers.conv(in_features, width, 3, stride=stride, padding=1, use_bias=False)
        self.norm1 = layers.batch_norm(width)
        self.conv2 = layers.conv(width, width, 3, padding=1, use_bias=False)
        self.norm2 = layers.batch_norm(width)
        self._init_shortcut(in_features, width, stride, residual, shortcut, layers)

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        return self._join(x, self.norm2(self.conv2(y)))


class Bottleneck(_Block):
    """1x1 - 3x3 - 1x1 convs: (N, H, W, C_in) -> (N, H/stride, W/stride, 4 width).

    The stride sits on the first 1x1 (`bottleneck_stride="1x1"`, the paper) or on the 3x3 ("3x3", torchvision's v1.5).
    """

    expansion = 4

    def __init__(self, in_features, width, stride, *, residual, shortcut, layers: LayerFactory, bottleneck_stride):
        out_features = self.expansion * width
        stride_1x1, stride_3x3 = (stride, 1) if bottleneck_stride == "1x1" else (1, stride)
        self.conv1 = layers.conv(in_features, width, 1, stride=stride_1x1, use_bias=False)
        self.norm1 = layers.batch_norm(width)
        self.conv2 = layers.conv(width, width, 3, stride=stride_3x3, padding=1, use_bias=False)
        self.norm2 = layers.batch_norm(width)
        self.conv3 = layers.conv(width, out_features, 1, use_bias=False)
        self.norm3 = layers.batch_norm(out_features)
        self._init_shortcut(in_features, out_features, stride, residual, shortcut, layers)

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = jax.nn.relu(self.norm2(self.conv2(y)))
        return self._join(x, self.norm3(self.conv3(y)))


def cifar_stem(in_channels, width, layers: LayerFactory):
    """3x3 conv - BN - ReLU (He et al. 2016, Section 4.2)."""
    return nnx.Sequential(
        layers.conv(in_channels, width, 3, padding=1, use_bias=False), layers.batch_norm(width), jax.nn.relu
    )


def imagenet_stem(in_channels, width, layers: LayerFactory):
    """7x7/2 conv - BN - ReLU - 3x3/2 max-pool: 224 -> 56."""
    return nnx.Sequential(
        layers.conv(in_channels, width, 7, stride=2, padding=3, use_bias=False),
        layers.batch_norm(width),
        jax.nn.relu,
        layers.max_pool(3, 2, 1),
    )


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = {"cifar": cifar_stem, "imagenet": imagenet_stem}


class ResNet(nnx.Module):
    """stem - stages of blocks - global average pool - FC: (N, H, W, C) -> logits (N, num_classes).

    Stage i has `stage_sizes[i]` blocks (`block`: "basic" or "bottleneck") of
    width `widths[i]`; its first block has stride 1 (i = 0) or 2, placed by
    `bottleneck_stride` in a bottleneck (:data:`BOTTLENECK_STRIDES`). `stem`:
    "cifar" (3x3 conv) or "imagenet" (7x7/2 conv and 3x3/2 max-pool). `layout`:
    "NHWC" (default) or "NCHW" (x (N, C, H, W), kernels OIHW). Any input size
    that survives the strides works. The presets :data:`CifarResNet` and
    :data:`ImageNetResNet` build the paper's nets.
    """

    def __init__(
        self,
        *,
        block="basic",
        stage_sizes=(2, 2, 2, 2),
        widths=(64, 128, 256, 512),
        stem="imagenet",
        residual=True,
        shortcut="B",
        bottleneck_stride="1x1",
        num_classes=10,
        in_channels=3,
        layout="NHWC",
        rngs,
        backward="custom",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        block = BLOCKS[check_choice("block", block, tuple(BLOCKS))]
        stem = STEMS[check_choice("stem", stem, tuple(STEMS))]
        check_choice("shortcut", shortcut, SHORTCUTS)
        check_choice("bottleneck_stride", bottleneck_stride, BOTTLENECK_STRIDES)
        residual = check_bool("residual", residual)
        if len(widths) != len(stage_sizes):
            raise ValueError(f"widths must hold {len(stage_sizes)} ints (one per stage), got {widths!r}")
        widths = tuple(check_positive_int("widths", w) for w in widths)
        stage_sizes = tuple(check_positive_int("stage_sizes", n) for n in stage_sizes)
        num_classes = check_positive_int("num_classes", num_classes)
        layers = LayerFactory(rngs, backward, dtype, param_dtype, layout)
        self.preset = None  # the name of the Preset that built it, if one did
        self.stem = stem(check_positive_int("in_channels", in_channels), widths[0], layers)
        stages, features = [], widths[0]
        for i, (size, width) in enumerate(zip(stage_sizes, widths)):
            blocks = []
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(
                    block(
                        features,
                        width,
                        stride,
                        residual=residual,
                        shortcut=shortcut,
                        layers=layers,
                        bottleneck_stride=bottleneck_stride,
                    )
                )
                features = block.expansion * width
            stages.append(nnx.Sequential(*blocks))
        self.stages = nnx.List(stages)
        self.pool = layers.global_avg_pool()
        self.fc = layers.linear(features, num_classes)

    def __call__(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.pool(x))


@dataclasses.dataclass(frozen=True, eq=False)
class Preset:
    """A family of the paper's ResNets as data, called like a class: `preset(depth=..., **options)` builds the
    :class:`ResNet` of `defaults` with the block and stage sizes `stages(depth)` gives (a ValueError naming
    `depth` for another depth); `options` (ResNet's keyword arguments) override both. `isinstance(model, preset)`
    is true for the models the preset built."""

    name: str
    defaults: Mapping[str, Any]
    stages: Callable[[int], dict[str, Any]]
    default_depth: int

    def __call__(self, *, depth: int | None = None, **options) -> ResNet:
        depth = self.default_depth if depth is None else depth
        model = ResNet(**(dict(self.defaults) | self.stages(depth) | options))
        model.preset = self.name
        return model

    def __instancecheck__(self, model) -> bool:
        return isinstance(model, ResNet) and model.preset == self.name

    @property
    def __signature__(self) -> inspect.Signature:
        """`depth` and ResNet's keyword arguments (what `create` and the docs read)."""
        depth = inspect.Parameter("depth", inspect.Parameter.KEYWORD_ONLY, default=self.default_depth)
        resnet = inspect.signature(ResNet.__init__).parameters.values()
        options = (p.replace(default=self.defaults.get(p.name, p.default)) for p in resnet if p.name != "self")
        return inspect.Signature([depth, *options], return_annotation=ResNet)


def cifar_stages(depth) -> dict[str, Any]:
    """ResNet-(6n+2): 3 stages of n basic blocks."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 for an int n >= 1, got {depth!r}")
    return {"block": "basic", "stage_sizes": ((depth - 2) // 6,) * 3}


IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
"""Table 1: depth -> (block, blocks per stage)."""


def imagenet_stages(depth) -> dict[str, Any]:
    """The block and stage sizes of :data:`IMAGENET_DEPTHS`."""
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"depth must be one of {tuple(IMAGENET_DEPTHS)}, got {depth!r}")
    block, stage_sizes = IMAGENET_DEPTHS[depth]
    return {"block": block, "stage_sizes": stage_sizes}


CifarResNet = Preset("cifar", dict(widths=(16, 32, 64), stem="cifar", shortcut="A"), cifar_stages, 20)
"""ResNet-(6n+2) for 32x32 images (Section 4.2): 3 stages of n basic blocks, widths 16-32-64, option-A shortcuts.
ResNet-20: 269,722 parameters for 10 classes; `residual=False` gives the plain net.

>>> from flax import nnx
>>> model = CifarResNet(depth=20, rngs=nnx.Rngs(0))
>>> model.fc.kernel.shape, isinstance(model, CifarResNet)
((64, 10), True)
"""

ImageNetResNet = Preset(
    "imagenet", dict(widths=(64, 128, 256, 512), stem="imagenet", shortcut="B"), imagenet_stages, 50
)
"""ResNet-18/34 (basic blocks) and 50/101/152 (bottlenecks) of Table 1: widths 64-128-256-512 (x4 out of a
bottleneck), option-B shortcuts. ResNet-50: 25,557,032 parameters for 1000 classes."""
