"""experiments/deconvnet.py: the projection of a single activation through convlib's reverse layers equals a reverse
pass computed by hand in numpy (unpooling to the first maximum, rectification, the transposed conv as a scatter of
the kernel), and differs from the gradient where the ReLU rules differ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import nn
from experiments import deconvnet


def tiny_net(seed=0):
    """conv 3x3 pad 1 (1 -> 2) - ReLU - max-pool 2 - conv 3x3 (2 -> 3) - ReLU - max-pool 2: 8x8 -> 1x1."""
    rngs = nnx.Rngs(seed)
    return [
        nn.Conv(1, 2, 3, padding=1, rngs=rngs),
        deconvnet.relu,
        nn.MaxPool(2),
        nn.Conv(2, 3, 3, rngs=rngs),
        deconvnet.relu,
        nn.MaxPool(2),
    ]


def by_hand(path, x, unit, rule):
    """The reverse pass for one image x (H, W, C) and one unit (row, column, channel) of path's output, in numpy
    loops; forward inputs computed by convlib (the reverse pass is what is checked)."""
    inputs = [x[None]]
    for layer in path:
        inputs.append(layer(inputs[-1]))
    inputs = [np.asarray(a[0], np.float64) for a in inputs]
    out = inputs.pop()
    signal = np.zeros_like(out)
    signal[unit] = out[unit]
    for layer, before in zip(reversed(path), reversed(inputs)):
        below = np.zeros_like(before)
        if layer is deconvnet.relu:
            below = np.maximum(signal, 0) if rule == "deconvnet" else signal * (before > 0)
        elif isinstance(layer, nn.MaxPool):  # the switch: the first maximum of each window, row by row
            k = layer.window[0]
            for i, j, c in np.ndindex(signal.shape):
                window = before[i * k : (i + 1) * k, j * k : (j + 1) * k, c]
                a, b = np.unravel_index(np.argmax(window), window.shape)
                below[i * k + a, j * k + b, c] += signal[i, j, c]
        else:  # transposed conv: each output position sends signal x kernel back over the inputs it read
            w = np.asarray(layer.kernel[...], np.float64)  # (K, K, C_in, C_out)
            (pad, _), k = layer.padding[0], w.shape[0]
            padded = np.zeros((before.shape[0] + 2 * pad, before.shape[1] + 2 * pad, before.shape[2]))
            for i, j, o in np.ndindex(signal.shape):
                padded[i : i + k, j : j + k, :] += signal[i, j, o] * w[:, :, :, o]
            below = padded[pad : pad + before.shape[0], pad : pad + before.shape[1]]
        signal = below
    return signal


def test_projection_equals_the_reverse_pass_by_hand_and_differs_from_the_gradient():
    path = tiny_net()
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    out = x
    for layer in path:
        out = layer(out)
    units = jnp.array([[0, 0, int(c)] for c in jnp.argmax(out[:, 0, 0], axis=-1)])  # each image's strongest unit
    projected = deconvnet.project(path, x, units)
    backprop = deconvnet.project(path, x, units, rule="backprop")

    def activation(image, unit):
        out = image[None]
        for layer in path:
            out = layer(out)
        return out[0, unit[0], unit[1], unit[2]]

    for n, unit in enumerate(np.asarray(units)):
        unit = tuple(int(u) for u in unit)
        assert float(activation(x[n], unit)) > 0  # a live unit: its projection is not trivially zero
        # float32 against float64 loops over a few dozen products: 1e-5
        np.testing.assert_allclose(projected[n], by_hand(path, x[n], unit, "deconvnet"), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(backprop[n], by_hand(path, x[n], unit, "backprop"), rtol=1e-5, atol=1e-5)
        gradient = jax.grad(activation)(x[n], unit)
        np.testing.assert_allclose(backprop[n], activation(x[n], unit) * gradient, rtol=1e-5, atol=1e-5)
    # the deconvnet's rectification differs from backprop's mask at the lower ReLU
    assert not np.allclose(projected, backprop, atol=1e-3)


def test_an_unknown_layer_or_rule_is_rejected():
    with pytest.raises(ValueError, match="no reverse layer"):
        deconvnet.project([jnp.tanh], jnp.ones((1, 2, 2, 1)), jnp.array([[0, 0, 0]]))
    with pytest.raises(ValueError, match="rule must be one of"):
        deconvnet.project([deconvnet.relu], jnp.ones((1, 2, 2, 1)), jnp.array([[0, 0, 0]]), rule="guided")
