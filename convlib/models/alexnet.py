"""AlexNet (Krizhevsky, Sutskever and Hinton 2012).

The paper's two-GPU split is expressed as filter groups: conv2, conv4 and conv5
are single convs with groups=2 (each half of the output channels reads one half
of the input channels), conv3 and the FC layers are full. Sharding the channel
axis of conv2/4/5 in halves over 2 devices reproduces the paper's Fig. 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from convlib import nn
from convlib.models.classifier import Classifier, check_dropout
from convlib.models.input_size import check_image_shape, check_input
from convlib.models.layer_factory import LayerFactory
from convlib.nn.validation import check_positive_int

IMAGENET = dict(input_size=224, conv1=(11, 4, 2), channels=(96, 256, 384, 384, 256), hidden=4096)
SMALL = dict(input_size=32, conv1=(5, 1, 2), channels=(48, 128, 192, 192, 128), hidden=1024)


class AlexNet(nnx.Module):
    """x (N, input_size, input_size, C) -> logits (N, num_classes).

    conv1 (kernel, stride, padding = `conv1`) - ReLU - LRN - max-pool 3/2 -
    conv2 5x5 g2 - ReLU - LRN - max-pool 3/2 - conv3 3x3 - ReLU - conv4 3x3 g2 - ReLU -
    conv5 3x3 g2 - ReLU - max-pool 3/2 - :class:`Classifier` (`hidden`, dropout).
    Defaults are the ImageNet net: conv1 11x11/4 padded by 2 (torchvision's
    choice; 224 and 227 inputs both give 55-27-13-6 maps), 60,965,224 parameters
    for 1000 classes. `SMALL` holds the 32x32 preset (`alexnet_small`).
    """

    def __init__(
        self,
        *,
        num_classes=10,
        in_channels=3,
        input_size=224,
        conv1=(11, 4, 2),
        channels=(96, 256, 384, 384, 256),
        hidden=4096,
        dropout=0.5,
        rngs,
        backward="custom",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        layers = LayerFactory(rngs, backward, dtype, param_dtype)
        self.input_size, self.in_channels = check_image_shape(input_size, in_channels)
        num_classes, dropout = check_positive_int("num_classes", num_classes), check_dropout(dropout)
        c1, c2, c3, c4, c5 = (check_positive_int("channels", c) for c in channels)
        kernel, stride, padding = conv1
        self.conv1 = layers.conv(in_channels, c1, kernel, stride=stride, padding=padding)
        self.norm1 = nn.LocalResponseNorm()
        self.pool1 = layers.max_pool(3, 2)
        self.conv2 = layers.conv(c1, c2, 5, padding=2, groups=2)
        self.norm2 = nn.LocalResponseNorm()
        self.pool2 = layers.max_pool(3, 2)
        self.conv3 = layers.conv(c2, c3, 3, padding=1)
        self.conv4 = layers.conv(c3, c4, 3, padding=1, groups=2)
        self.conv5 = layers.conv(c4, c5, 3, padding=1, groups=2)
        self.pool5 = layers.max_pool(3, 2)
        size = (input_size, input_size)
        for layer in (self.conv1, self.pool1, self.conv2, self.pool2, self.conv3, self.conv4, self.conv5, self.pool5):
            size = layer.output_spatial(size)
        self.classifier = Classifier(c5 * size[0] * size[1], hidden, num_classes, dropout, layers)

    def __call__(self, x):
        check_input(x, self.input_size, self.in_channels, "AlexNet")
        x = self.pool1(self.norm1(jax.nn.relu(self.conv1(x))))
        x = self.pool2(self.norm2(jax.nn.relu(self.conv2(x))))
        x = jax.nn.relu(self.conv3(x))
        x = jax.nn.relu(self.conv4(x))
        x = self.pool5(jax.nn.relu(self.conv5(x)))
        return self.classifier(nn.flatten(x))
