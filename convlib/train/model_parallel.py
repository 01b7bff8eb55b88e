"""Model parallelism by output channels: AlexNet's two-GPU split (Krizhevsky et al. 2012, Fig. 2) as sharding.

As in the paper, every layer's filters (and so its feature maps) are split between the devices: device d holds
output channels d·C/D ... (d+1)·C/D - 1 of each conv and units d·U/D ... of each dense layer. A conv with
`groups` divisible by the device count (AlexNet's conv2, conv4, conv5) then reads only the input channels its
own device holds: the paper's "columns" need no communication there. A conv with groups=1 (conv3) and the dense
layers read every channel, so XLA gathers the halves exactly where the paper's GPUs communicate. Channel-local
layers (ReLU, pooling) run where their maps are; LRN exchanges only the few channels at the boundary.
Takes any NNX module; layers whose output count does not divide by the device count stay replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convlib import nn, ops

AXIS = "model"


def _output_axis(module) -> int | None:
    """Which kernel axis holds the output channels/units, for the layers we split."""
    if isinstance(module, nn.Conv):
        return ops.layout_axes(module.layout, module.ndim).kernel_out
    if isinstance(module, nnx.Linear):
        return 1
    return None


def output_channel_specs(model: nnx.Module, num_devices: int, axis: str = AXIS) -> nnx.State:
    """PartitionSpecs for `nnx.state(model)`: conv and dense kernels (and biases) split on their outputs."""
    specs = jax.tree.map(lambda _: PartitionSpec(), nnx.state(model))
    for path, module in model.iter_modules():
        out_axis = _output_axis(module)
        if out_axis is None or module.kernel.shape[out_axis] % num_devices:
            continue
        target = specs
        for key in path:
            target = target[key]
        kernel_spec = [None] * module.kernel.ndim
        kernel_spec[out_axis] = axis
        target["kernel"] = PartitionSpec(*kernel_spec)
        if getattr(module, "bias", None) is not None:
            target["bias"] = PartitionSpec(axis)
    return specs


def split_output_channels(model: nnx.Module, num_devices: int, axis: str = AXIS) -> None:
    """Marks every conv whose output channels divide by `num_devices` to keep its outputs split over `axis`."""
    for _, module in model.iter_modules():
        if isinstance(module, nn.Conv) and module.out_features % num_devices == 0:
            module.output_sharding = axis


def shard_output_channels(model: nnx.Module, devices=None, axis: str = AXIS):
    """Splits `model` over `devices` (default: all) by output channels; returns `(graphdef, state, mesh)`.

    Run it under the mesh: `with jax.set_mesh(mesh): jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)`.
    The convs constrain their outputs to stay split; XLA partitions the rest from the parameters' placement.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.asarray(devices), (axis,))
    split_output_channels(model, len(devices), axis)
    specs = output_channel_specs(model, len(devices), axis)
    graphdef, state = nnx.split(model)
    return graphdef, jax.device_put(state, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)), mesh
