"""The multi-scale context aggregation module (Yu and Koltun 2016, Table 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convlib.models.layer_factory import LayerFactory
from convlib.nn.validation import check_choice, check_float, check_positive_int

DILATIONS = (1, 1, 2, 4, 8, 16, 1)  # layers 1-7, 3x3; layer 8 is 1x1
WIDTH_FACTORS = {"basic": (1,) * 8, "large": (2, 2, 4, 8, 16, 32, 32, 1)}


def identity_init(channels: int, noise: float):
    """The paper's identity initialisation of a layer (kh, kw, c_in, c_out), C = `channels`:

        k(t, a -> b) = C / c_out  if t is the centre tap and floor(a C / c_in) == floor(b C / c_out)
                       eps ~ N(0, noise^2) otherwise

    With C maps x_j in, every map of group j holds x_j C / c_in, so the layer passes
    its input through (for non-negative input); `noise` > 0 breaks ties between maps
    with a common predecessor (large module); the basic module uses noise 0.
    """

    def init(key, shape, dtype=jnp.float32):
        kh, kw, c_in, c_out = shape
        centre = np.zeros(shape, bool)
        centre[kh // 2, kw // 2] = (np.arange(c_in)[:, None] * channels // c_in) == (
            np.arange(c_out)[None, :] * channels // c_out
        )
        kernel = noise * jax.random.normal(key, shape, dtype) if noise else jnp.zeros(shape, dtype)
        return jnp.where(centre, jnp.asarray(channels / c_out, dtype), kernel)

    return init


class ContextModule(nnx.Module):
    """Context aggregation: (N, H, W, C) -> (N, H, W, C), C = `channels`.

    Seven 3x3 convs with dilations 1, 1, 2, 4, 8, 16, 1 ("same" padding, ReLU),
    then a 1x1 conv back to C maps (no ReLU): receptive fields 3, 5, 9, 17, 33, 65,
    67, 67. Widths: "basic" C throughout; "large" 2C, 2C, 4C, 8C, 16C, 32C, 32C, C.
    `init`: "identity" (the paper's, :func:`identity_init`, noise `init_noise`
    in the large module) or "random" (He normal); biases start at zero.
    """

    def __init__(
        self,
        *,
        channels,
        size="basic",
        init="identity",
        init_noise=1e-3,
        rngs,
        backward="custom",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        channels = check_positive_int("channels", channels)
        init_noise = check_float("init_noise", init_noise, minimum=0.0)
        check_choice("size", size, tuple(WIDTH_FACTORS))
        check_choice("init", init, ("identity", "random"))
        layers = LayerFactory(rngs, backward, dtype, param_dtype)
        noise = init_noise if size == "large" else 0.0
        kernel_init = identity_init(channels, noise) if init == "identity" else None
        widths = [channels * f for f in WIDTH_FACTORS[size]]
        self.layers = nnx.List(
            layers.conv(c_in, c_out, k, dilation=d, padding=d * (k // 2), kernel_init=kernel_init)
            for c_in, c_out, k, d in zip([channels, *widths[:-1]], widths, (3,) * 7 + (1,), DILATIONS + (1,))
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)
