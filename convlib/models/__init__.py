"""The classic architectures as Flax NNX modules, built by name: `create(name, ...)`.

Names (`available()`): lenet5, lenet5_modern, alexnet, alexnet_small,
`vgg{11,13,16,19}[_bn][_small]`, resnet{20,32,44,56,110}, plain{20,32,44,56,110},
resnet{18,34,50,101,152}, context_basic, context_large. PyTorch weights load with
`load_torch_state_dict(model, state_dict)`.
"""

from convlib.models.alexnet import AlexNet
from convlib.models.context import ContextModule, identity_init
from convlib.models.cost import abstract_model, flops, param_count
from convlib.models.layer_factory import LayerFactory
from convlib.models.lenet import C3_TABLE, LeNet5, LeNet5Modern
from convlib.models.registry import accepted_options, available, create
from convlib.models.resnet import CifarResNet, ImageNetResNet, ResNet
from convlib.models.torch_weights import load_torch_state_dict, torch_shapes
from convlib.models.vgg import VGG

__all__ = [
    "C3_TABLE",
    "VGG",
    "AlexNet",
    "CifarResNet",
    "ContextModule",
    "ImageNetResNet",
    "LayerFactory",
    "LeNet5",
    "LeNet5Modern",
    "ResNet",
    "abstract_model",
    "accepted_options",
    "available",
    "create",
    "flops",
    "identity_init",
    "load_torch_state_dict",
    "param_count",
    "torch_shapes",
]
