"""Whole-model gradients: backward="custom" (hand-derived VJPs) equals backward="autodiff", in float64.

One small variant per architecture (narrow widths, the fewest blocks, batch 2), in
training mode (batch statistics; dropout masks from the same `dropout` stream in both twins).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import models


def registered(name, **options):
    return lambda rngs, **kw: models.create(name, rngs=rngs, **kw, **options)


def resnet(**options):
    return lambda rngs, **kw: models.ResNet(rngs=rngs, **kw, **options)


# Each architecture at its smallest: one block per stage where the depth is free.
CASES = {
    "lenet5": (registered("lenet5", in_channels=1), (32, 1)),
    "lenet5_modern": (
        registered("lenet5_modern", in_channels=1, input_size=28, activation="tanh", pool="avg"),
        (28, 1),
    ),
    "alexnet_small": (registered("alexnet_small", channels=(4, 8, 8, 8, 4), hidden=16), (32, 3)),
    "vgg11_bn_small": (registered("vgg11_bn_small", widths=(4, 4, 8, 8, 8), hidden=8), (32, 3)),
    "resnet8 (CIFAR, option A)": (
        resnet(block="basic", stage_sizes=(1, 1, 1), widths=(4, 4, 8), stem="cifar", shortcut="A"),
        (32, 3),
    ),
    "plain8 (CIFAR)": (
        resnet(block="basic", stage_sizes=(1, 1, 1), widths=(4, 4, 8), stem="cifar", residual=False),
        (32, 3),
    ),
    "resnet10 (ImageNet, basic, option B)": (
        resnet(block="basic", stage_sizes=(1, 1, 1, 1), widths=(4, 4, 4, 8)),
        (32, 3),
    ),
    "resnet14 (ImageNet, bottleneck)": (
        resnet(block="bottleneck", stage_sizes=(1, 1, 1, 1), widths=(2, 2, 2, 2)),
        (32, 3),
    ),
    "context_basic": (registered("context_basic", num_classes=3), (16, 3)),
    "context_large": (registered("context_large", num_classes=2), (16, 2)),
}
RELATIVE_TOLERANCE = 1e-10


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """XLA with most optimisations off: these graphs run once, so compile time is what counts."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def build(make, backward):
    rngs = nnx.Rngs(params=jax.random.key(0, impl="rbg"), dropout=jax.random.key(1, impl="rbg"))
    return make(rngs, backward=backward, param_dtype=jnp.float64)


def loss(model, x):
    return jnp.sum(jnp.sin(model(x)))  # a non-linear loss, so every output gets a distinct cotangent


@nnx.jit
def both_gradients(custom, autodiff, x):
    grad = nnx.grad(loss, argnums=(0, 1))
    return grad(custom, x), grad(autodiff, x)


@pytest.mark.parametrize("name", list(CASES))
def test_custom_backward_equals_autodiff(name):
    make, (size, channels) = CASES[name]
    with jax.enable_x64(True):
        custom = build(make, "custom")
        # The twin gets the same structure from the same seed; its values are copied
        # (bit-identical, no second round of initialiser compiles).
        autodiff = nnx.eval_shape(lambda: build(make, "autodiff"))
        nnx.update(autodiff, nnx.clone(nnx.state(custom)))
        x = jax.random.normal(jax.random.key(2), (2, size, size, channels), jnp.float64)
        (params_c, x_c), (params_a, x_a) = both_gradients(custom, autodiff, x)
        leaves_c = jax.tree.leaves(params_c) + [x_c]
        leaves_a = jax.tree.leaves(params_a) + [x_a]
        assert len(leaves_c) == len(leaves_a) > 1
        for got, want in zip(leaves_c, leaves_a):
            assert got.dtype == jnp.float64
            scale = float(jnp.max(jnp.abs(want)))
            assert scale > 0
            np.testing.assert_allclose(got, want, rtol=0, atol=RELATIVE_TOLERANCE * scale)
