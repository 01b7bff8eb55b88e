"""Whole-model gradients: backward="custom" (hand-derived VJPs) equals backward="autodiff", in float64.

One small variant per architecture (narrow widths, tiny batch), in training mode
(batch statistics, dropout masks from the same `dropout` stream in both twins).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import models

CASES = {
    "lenet5": dict(in_channels=1),
    "lenet5_rbf": dict(in_channels=1, head="rbf"),
    "lenet5_modern": dict(in_channels=1, input_size=28, activation="tanh", pool="avg"),
    "alexnet_small": dict(channels=(4, 8, 8, 8, 4), hidden=16),
    "vgg11_bn_small": dict(widths=(4, 4, 8, 8, 8), hidden=8),
    "vgg16_small": dict(config="C", widths=(2, 4, 4, 4, 4), hidden=8, input_size=28),
    "resnet20": dict(widths=(4, 4, 8)),
    "plain20": dict(widths=(4, 4, 8)),
    "resnet18": dict(widths=(4, 4, 4, 8), input_size=None),
    "resnet50": dict(widths=(2, 2, 2, 2), input_size=None),
    "context_basic": dict(num_classes=3),
    "context_large": dict(num_classes=2),
}
RELATIVE_TOLERANCE = 1e-10


def build(name, backward, options):
    options = {k: v for k, v in options.items() if k != "input_size" or v is not None}
    name = name.replace("_rbf", "")
    rngs = nnx.Rngs(params=jax.random.key(0, impl="rbg"), dropout=jax.random.key(1, impl="rbg"))
    return models.create(name, rngs=rngs, backward=backward, param_dtype=jnp.float64, **options)


def loss(model, x):
    return jnp.sum(jnp.sin(model(x)))  # a non-linear loss, so every output gets a distinct cotangent


@nnx.jit
def both_gradients(custom, autodiff, x):
    grad = nnx.grad(loss, argnums=(0, 1))
    return grad(custom, x), grad(autodiff, x)


@pytest.mark.parametrize("name", list(CASES))
def test_custom_backward_equals_autodiff(name):
    options = CASES[name]
    with jax.enable_x64(True):
        custom = build(name, "custom", options)
        # The twin gets the same structure from the same seed; its values are copied
        # (bit-identical, no second round of initialiser compiles).
        autodiff = nnx.eval_shape(lambda: build(name, "autodiff", options))
        nnx.update(autodiff, nnx.clone(nnx.state(custom)))
        size = options.get("input_size") or 32
        channels = options.get("in_channels", options.get("num_classes", 3) if name.startswith("context") else 3)
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
