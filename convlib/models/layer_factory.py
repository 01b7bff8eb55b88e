"""`LayerFactory`: builds a model's layers with one `backward`, dtype policy and `Rngs`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from convlib import nn, ops

BATCH_NORM_MOMENTUM = 0.9  # running average decay; PyTorch's momentum=0.1
BATCH_NORM_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class LayerFactory:
    """Creates layers that share the settings of one model.

    `backward` and `layout` reach every conv and pool built here (and `layout` every
    BatchNorm); `dtype` (compute) and `param_dtype` (storage) reach every layer with
    parameters; parameters and dropout keys come from `rngs` (streams `params` and
    `dropout`, else `default`). The factory stores the values; the layers check them.
    """

    rngs: nnx.Rngs
    backward: str = "custom"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    layout: str = "NHWC"

    def conv(self, in_features, out_features, kernel_size, **kwargs) -> nn.Conv:
        return nn.Conv(
            in_features,
            out_features,
            kernel_size,
            layout=self.layout,
            backward=self.backward,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
            **kwargs,
        )

    def linear(self, in_features, out_features, **kwargs) -> nnx.Linear:
        """Fully connected layer (Flax's default LeCun-normal kernel, zero bias unless given)."""
        return nnx.Linear(
            in_features, out_features, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs, **kwargs
        )

    def batch_norm(self, features) -> nnx.BatchNorm:
        """BatchNorm over the channel axis of an image batch; its running statistics are kept in `param_dtype`."""
        norm = nnx.BatchNorm(
            features,
            axis=ops.layout_axes(self.layout, 2).channel,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=self.rngs,
        )
        # Flax creates them in float32 whatever param_dtype is.
        norm.mean = nnx.BatchStat(jnp.zeros((features,), self.param_dtype))
        norm.var = nnx.BatchStat(jnp.ones((features,), self.param_dtype))
        return norm

    def dropout(self, rate) -> nnx.Dropout:
        return nnx.Dropout(rate, rngs=self.rngs)

    def max_pool(self, window, stride=None, padding=0, **kwargs) -> nn.MaxPool:
        return nn.MaxPool(window, stride, padding, layout=self.layout, backward=self.backward, **kwargs)

    def avg_pool(self, window, stride=None, padding=0, **kwargs) -> nn.AvgPool:
        return nn.AvgPool(window, stride, padding, layout=self.layout, backward=self.backward, **kwargs)

    def global_avg_pool(self) -> nn.GlobalAvgPool:
        return nn.GlobalAvgPool(layout=self.layout, backward=self.backward)
