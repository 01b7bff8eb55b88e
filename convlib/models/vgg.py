"""VGG (Simonyan and Zisserman 2015), configurations A-E of Table 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import nn
from convlib.models.classifier import Classifier, check_dropout
from convlib.models.input_size import check_image_shape, check_input
from convlib.models.layer_factory import LayerFactory
from convlib.nn.validation import check_choice, check_positive_int

WIDTHS = (64, 128, 256, 512, 512)
# Kernel sizes of the convs in each of the five blocks; C is D with 1x1 convs last in blocks 3-5.
CONFIGS = {
    "A": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "B": ((3, 3),) * 5,
    "C": ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    "D": ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "E": ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}
DEPTHS = {name: sum(map(len, blocks)) + 3 for name, blocks in CONFIGS.items()}  # A 11, B 13, C/D 16, E 19
DEFAULT_CONFIG = {11: "A", 13: "B", 16: "D", 19: "E"}
SMALL = dict(input_size=32, hidden=512)


class ConvBlock(nnx.Module):
    """Convs (kernel 3 padded by 1, or 1x1) each followed by [BatchNorm and] ReLU, then a 2x2 max-pool.

    x (N, H, W, C_in) -> (N, ceil(H/2), ceil(W/2), width). The pool uses ceil
    mode (equal to floor on 224 and 32 inputs) so that 28x28 inputs reach 1x1.
    Convs followed by BatchNorm have no bias.
    """

    def __init__(self, in_features, width, kernels, batch_norm: bool, layers: LayerFactory):
        self.convs = nnx.List(
            layers.conv(in_features if i == 0 else width, width, k, padding=k // 2, use_bias=not batch_norm)
            for i, k in enumerate(kernels)
        )
        self.norms = nnx.List(layers.batch_norm(width) for _ in kernels) if batch_norm else None
        self.pool = layers.max_pool(2, ceil_mode=True)

    def output_spatial(self, size):
        for conv in self.convs:
            size = conv.output_spatial(size)
        return self.pool.output_spatial(size)

    def __call__(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = jax.nn.relu(x)
        return self.pool(x)


class VGG(nnx.Module):
    """x (N, input_size, input_size, C) -> logits (N, num_classes).

    Five :class:`ConvBlock` of `widths` (default 64-128-256-512-512) with the
    kernels of `config` ("A"-"E"; None: the default for `depth`: 11 A, 13 B,
    16 D, 19 E; depth 16 also takes "C"), then :class:`Classifier` with `hidden`
    units (4096 on ImageNet; 512 in the 32x32 preset `SMALL`) and dropout.
    """

    def __init__(
        self,
        *,
        depth=16,
        config=None,
        batch_norm=False,
        num_classes=10,
        in_channels=3,
        input_size=224,
        widths=WIDTHS,
        hidden=4096,
        dropout=0.5,
        rngs,
        backward="custom",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        if depth not in DEFAULT_CONFIG:
            raise ValueError(f"depth must be one of {tuple(DEFAULT_CONFIG)}, got {depth!r}")
        config = DEFAULT_CONFIG[depth] if config is None else config
        check_choice("config", config, tuple(CONFIGS))
        if DEPTHS[config] != depth:
            raise ValueError(f"config {config!r} has depth {DEPTHS[config]}, not depth={depth}")
        layers = LayerFactory(rngs, backward, dtype, param_dtype)
        self.input_size, self.in_channels = check_image_shape(input_size, in_channels)
        num_classes, dropout = check_positive_int("num_classes", num_classes), check_dropout(dropout)
        if len(widths) != len(WIDTHS):
            raise ValueError(f"widths must hold {len(WIDTHS)} ints, got {widths!r}")
        widths = tuple(check_positive_int("widths", w) for w in widths)
        self.blocks = nnx.List(
            ConvBlock(c_in, width, kernels, batch_norm, layers)
            for c_in, width, kernels in zip((in_channels, *widths), widths, CONFIGS[config])
        )
        size = (input_size, input_size)
        for block in self.blocks:
            size = block.output_spatial(size)
        self.classifier = Classifier(widths[-1] * size[0] * size[1], hidden, num_classes, dropout, layers)

    def __call__(self, x):
        check_input(x, self.input_size, self.in_channels, "VGG")
        for block in self.blocks:
            x = block(x)
        return self.classifier(nn.flatten(x))
