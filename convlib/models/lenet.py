"""LeNet-5 (LeCun, Bottou, Bengio and Haffner 1998), faithful and modern.

Both read a 32x32 field; a 28x28 input (MNIST / Fashion-MNIST) is zero-padded
to it inside C1, by 2 on each side, as the paper centred its 28x28 digits in a
32x32 field. Those are the two input sizes the nets take.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convlib import nn
from convlib.models.input_size import check_image_shape, check_input, check_input_size
from convlib.models.layer_factory import LayerFactory
from convlib.nn.validation import check_choice, check_positive_int

FIELD = 32  # the paper's input field
INPUT_SIZES = (FIELD, 28)  # the field itself, or MNIST-sized digits centred in it

# Table I: the S2 maps each C3 map reads (3 consecutive x 6, 4 consecutive x 6,
# 4 non-consecutive x 3, all six x 1), C3 maps in order.
C3_TABLE = (
    (0, 1, 2),
    (1, 2, 3),
    (2, 3, 4),
    (3, 4, 5),
    (4, 5, 0),
    (5, 0, 1),
    (0, 1, 2, 3),
    (1, 2, 3, 4),
    (2, 3, 4, 5),
    (3, 4, 5, 0),
    (4, 5, 0, 1),
    (5, 0, 1, 2),
    (0, 1, 3, 4),
    (1, 2, 4, 5),
    (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)
"""LeNet-5's Table I: for each of the 16 C3 maps, the S2 maps it reads."""


def c1_padding(input_size: int) -> int:
    """Zero padding per side that centres an input of `input_size` (32 or 28) in the 32x32 field."""
    if check_input_size(input_size) not in INPUT_SIZES:
        raise ValueError(
            f"input_size must be one of {INPUT_SIZES} (the paper's field, or MNIST's digits), got {input_size}"
        )
    return (FIELD - input_size) // 2


def scaled_tanh(a):
    """The paper's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3."""
    return 1.7159 * jnp.tanh(2.0 * a / 3.0)


def uniform_fan_in(key, shape, dtype=jnp.float32, fan_in=None):
    """The paper's init: uniform in (-2.4 / F, 2.4 / F), F = the fan-in.

    F defaults to prod(shape[:-1]), the fan-in of a kernel (..., in, out).
    """
    if fan_in is None:
        fan_in = math.prod(shape[:-1])
    return jax.random.uniform(key, shape, dtype, -2.4 / fan_in, 2.4 / fan_in)


class Subsampling(nnx.Module):
    """S2/S4: sum of each 2x2 window x a trainable coefficient + a trainable bias, per map.

    x (N, H, W, C) -> (N, H/2, W/2, C); 2 C parameters. No squashing here.
    """

    def __init__(self, channels: int, layers: LayerFactory):
        self.pool = layers.avg_pool(2)
        self.dtype = layers.dtype
        self.coefficient = nnx.Param(uniform_fan_in(layers.rngs.params(), (channels,), layers.param_dtype, fan_in=4))
        self.bias = nnx.Param(jnp.zeros((channels,), layers.param_dtype))

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x, self.coefficient[...])
        coefficient, bias = self.coefficient[...].astype(dtype), self.bias[...].astype(dtype)
        return 4.0 * self.pool(x.astype(dtype)) * coefficient + bias


class SparseConv(nnx.Module):
    """A conv in which output map j reads only the input maps `table[j]` (C3 of LeNet-5).

    Consecutive output maps with the same fan-in form one grouped conv over the
    gathered input maps, so only the table's connections have parameters:
    prod(K) * sum(len(row)) weights + one bias per output map.
    x (N, H, W, C_in) -> (N, H', W', len(table)).
    """

    def __init__(self, table, kernel_size: int, layers: LayerFactory):
        runs = []
        for row in table:
            if runs and len(runs[-1][-1]) == len(row):
                runs[-1].append(row)
            else:
                runs.append([row])
        self.gathers = tuple(tuple(c for row in run for c in row) for run in runs)
        self.convs = nnx.List(
            layers.conv(len(gather), len(run), kernel_size, groups=len(run), kernel_init=uniform_fan_in)
            for gather, run in zip(self.gathers, runs)
        )

    def __call__(self, x):
        return jnp.concatenate(
            [conv(x[..., np.asarray(gather)]) for gather, conv in zip(self.gathers, self.convs)], axis=-1
        )


class RBFPrototypes(nnx.Variable):
    """Fixed (non-trainable) parameter vectors of the RBF output units."""


class EuclideanRBF(nnx.Module):
    """Output layer y_i = sum_j (x_j - w_ij)^2: the squared distance to class i's prototype.

    x (N, D) -> (N, num_classes); lower is better. The prototypes are fixed
    (:class:`RBFPrototypes`, not `nnx.Param`) and drawn uniformly from {-1, +1}
    (the paper fixed them to +-1 stylised 7x12 character bitmaps).
    """

    def __init__(self, features: int, num_classes: int, layers: LayerFactory):
        signs = jax.random.rademacher(layers.rngs.params(), (num_classes, features))
        self.prototypes = RBFPrototypes(signs.astype(layers.param_dtype))
        self.dtype = layers.dtype

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x, self.prototypes[...])
        return jnp.sum(jnp.square(x[:, None, :].astype(dtype) - self.prototypes[...].astype(dtype)), axis=-1)


class LeNet5(nnx.Module):
    """LeNet-5 as in the paper: x (N, input_size, input_size, C) -> (N, num_classes).

    C1 6@5x5 - S2 - C3 16@5x5 (Table I connections, 1,516 parameters) - S4 -
    C5 120@5x5 - F6 84 - output, each layer up to F6 followed by
    f(a) = 1.7159 tanh(2a/3); weights uniform in (-2.4/F, 2.4/F). `head`:
    "softmax" (default: a linear layer giving logits, for cross-entropy) or
    "rbf" (:class:`EuclideanRBF`, outputs distances, lower = better).
    60,000 trainable parameters with in_channels=1 and the RBF head.
    """

    def __init__(
        self,
        *,
        num_classes=10,
        in_channels=3,
        input_size=FIELD,
        head="softmax",
        rngs,
        backward="custom",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        layers = LayerFactory(rngs, backward, dtype, param_dtype)
        self.input_size, self.in_channels = check_image_shape(input_size, in_channels)
        num_classes = check_positive_int("num_classes", num_classes)
        check_choice("head", head, ("softmax", "rbf"))
        self.c1 = layers.conv(in_channels, 6, 5, padding=c1_padding(input_size), kernel_init=uniform_fan_in)
        self.s2 = Subsampling(6, layers)
        self.c3 = SparseConv(C3_TABLE, 5, layers)
        self.s4 = Subsampling(16, layers)
        self.c5 = layers.conv(16, 120, 5, kernel_init=uniform_fan_in)
        self.f6 = layers.linear(120, 84, kernel_init=uniform_fan_in)
        self.output = (
            layers.linear(84, num_classes, kernel_init=uniform_fan_in)
            if head == "softmax"
            else EuclideanRBF(84, num_classes, layers)
        )

    def __call__(self, x):
        check_input(x, self.input_size, self.in_channels, "lenet5")
        for layer in (self.c1, self.s2, self.c3, self.s4, self.c5):
            x = scaled_tanh(layer(x))
        x = scaled_tanh(self.f6(nn.flatten(x)))
        return self.output(x)


ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


class LeNet5Modern(nnx.Module):
    """LeNet-5 with full connections: x (N, input_size, input_size, C) -> logits (N, num_classes).

    conv c1@5x5 - act - pool 2 - conv c2@5x5 - act - pool 2 - FC h1 - act - FC h2 - act - FC,
    with (c1, c2) = `channels` (default (6, 16)), (h1, h2) = `hidden` (default
    (120, 84)), `activation` "relu" or "tanh", `pool` "max" or "avg". 28x28 inputs
    are padded by 2 in the first conv (see the module docstring).
    """

    def __init__(
        self,
        *,
        num_classes=10,
        in_channels=3,
        input_size=FIELD,
        activation="relu",
        pool="max",
        channels=(6, 16),
        hidden=(120, 84),
        rngs,
        backward="custom",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        layers = LayerFactory(rngs, backward, dtype, param_dtype)
        self.input_size, self.in_channels = check_image_shape(input_size, in_channels)
        num_classes = check_positive_int("num_classes", num_classes)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        check_choice("pool", pool, ("max", "avg"))
        c1, c2 = (check_positive_int("channels", c) for c in channels)
        h1, h2 = (check_positive_int("hidden", h) for h in hidden)
        make_pool = layers.max_pool if pool == "max" else layers.avg_pool
        self.conv1 = layers.conv(in_channels, c1, 5, padding=c1_padding(input_size))
        self.pool1 = make_pool(2)
        self.conv2 = layers.conv(c1, c2, 5)
        self.pool2 = make_pool(2)
        self.fc1 = layers.linear(c2 * 5 * 5, h1)
        self.fc2 = layers.linear(h1, h2)
        self.fc3 = layers.linear(h2, num_classes)

    def __call__(self, x):
        check_input(x, self.input_size, self.in_channels, "lenet5_modern")
        act = ACTIVATIONS[self.activation]
        x = self.pool1(act(self.conv1(x)))
        x = self.pool2(act(self.conv2(x)))
        x = act(self.fc1(nn.flatten(x)))
        return self.fc3(act(self.fc2(x)))
