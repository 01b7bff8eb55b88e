"""Zeiler & Fergus's deconvnet (2014, Section 2.1): a feature activation projected back to input space through the
reverse of each layer, built from convlib's own reverse layers.

Going down from the activation (all the others in its layer set to zero), each layer of the forward path is undone:
  - max-pool: unpooling with the forward pass's switches, the position of each window's maximum (the first one in
    row-major window order: the rule of `convlib.ops.max_pool`'s hand-derived backward, which is what unpools here);
  - ReLU: the signal is rectified, relu(signal) ("deconvnet" rule). Backprop's rule instead masks the signal by
    where the forward input was positive, signal * (x > 0) ("backprop" rule), which gives the gradient;
  - conv: the transposed convolution with the same kernel, `convlib.ops.conv_transpose` (the hand-derived dE/dX:
    the full convolution of the dilated signal with the rotated kernel); biases are not used.
With the "backprop" rule the projection is the activation's value times its gradient with respect to the input;
the two differ only where a ReLU below the top sees a signal whose sign disagrees with the forward input's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from convlib import models, nn, ops

RULES = ("deconvnet", "backprop")


def relu(x: jax.Array) -> jax.Array:
    """The ReLU of a forward path (a marker the reverse pass recognises)."""
    return jax.nn.relu(x)


def lenet_stage_paths(model) -> list[list]:
    """The forward path up to the end of each stage (see experiments/feature_maps.py) of a `lenet5_modern` with
    ReLUs and max-pools: [[conv1, relu, pool1], [conv1, relu, pool1, conv2, relu, pool2]]."""
    if not isinstance(model, models.LeNet5Modern) or model.activation != "relu":
        raise ValueError(f"model must be a lenet5_modern with ReLUs, got {type(model).__name__}")
    if not isinstance(model.pool1, nn.MaxPool):
        raise ValueError("model must be a lenet5_modern with max-pooling (pool='max')")
    path = [model.conv1, relu, model.pool1, model.conv2, relu, model.pool2]
    return [path[:3], path]


def _reverse(layer, x: jax.Array, signal: jax.Array, rule: str) -> jax.Array:
    """The reverse of `layer` whose forward input was x (N, H, W, C), applied to `signal` (layer(x)'s shape)."""
    if layer is relu:
        with jax.named_scope(f"relu_{rule}"):
            return jax.nn.relu(signal) if rule == "deconvnet" else jnp.where(x > 0, signal, 0.0)
    if isinstance(layer, nn.MaxPool):
        with jax.named_scope("unpool_with_switches"):
            return jax.vjp(layer, x)[1](signal)[0]
    if isinstance(layer, nn.Conv):
        with jax.named_scope("conv_transpose"):
            geometry = layer.geometry(x.shape[1:-1])
            spatial = [
                (o - 1) * s - lo - hi + k
                for o, s, (lo, hi), k in zip(
                    signal.shape[1:-1], geometry.stride, geometry.padding, geometry.effective_kernel
                )
            ]
            extra = tuple(h - n for h, n in zip(x.shape[1:-1], spatial))  # input rows the forward conv never reached
            return ops.conv_transpose(
                signal,
                layer.kernel[...],
                stride=geometry.stride,
                padding=geometry.padding,
                dilation=geometry.dilation,
                groups=geometry.groups,
                output_padding=extra,
            )
    raise ValueError(f"no reverse layer for {layer!r}: the path may hold convlib nn.Conv, nn.MaxPool and relu")


def project(path: Sequence, x: jax.Array, units: jax.Array, rule: str = "deconvnet") -> jax.Array:
    """Projects, for each image, one activation of the output of `path` back to input space.

    Args:
      path: layers applied in order (convlib `nn.Conv`, `nn.MaxPool` and `relu`), NHWC.
      x: images (N, H, W, C_in), preprocessed as the model expects.
      units: int (N, 3): for image n, the activation (row, column, channel) of path's output to project; every other
        activation of that output is set to zero.
      rule: "deconvnet" (rectify the signal at each ReLU) or "backprop" (mask it by the forward input).
    Returns:
      (N, H, W, C_in): the projection of each image's activation.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> conv = nn.Conv(1, 1, 2, use_bias=False, kernel_init=lambda *_: jnp.ones((2, 2, 1, 1)), rngs=nnx.Rngs(0))
    >>> project([conv, relu], jnp.ones((1, 3, 3, 1)), jnp.array([[0, 0, 0]]))[0, ..., 0]
    Array([[4., 4., 0.],
           [4., 4., 0.],
           [0., 0., 0.]], dtype=float32)
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    inputs = [x]
    for layer in path:
        inputs.append(layer(inputs[-1]))
    out, units = inputs.pop(), jnp.asarray(units)
    n = jnp.arange(out.shape[0])
    rows, cols, channels = units[:, 0], units[:, 1], units[:, 2]
    signal = jnp.zeros_like(out).at[n, rows, cols, channels].set(out[n, rows, cols, channels])
    for layer, layer_input in zip(reversed(path), reversed(inputs)):
        signal = _reverse(layer, layer_input, signal, rule)
    return signal
