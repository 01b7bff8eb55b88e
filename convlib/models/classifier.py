"""The fully connected head of AlexNet and VGG: two hidden ReLU layers with dropout, then logits."""

from __future__ import annotations

import jax
from flax import nnx

from convlib.models.layer_factory import LayerFactory
from convlib.nn.validation import check_float, check_positive_int


def check_dropout(dropout) -> float:
    """`dropout` as a float in [0, 1): the probability of dropping a unit."""
    return check_float("dropout", dropout, 0.0, 1.0, open_maximum=True)


class Classifier(nnx.Module):
    """x (N, in_features) -> FC hidden - ReLU - dropout - FC hidden - ReLU - dropout - FC -> (N, num_classes).

    Dropout on the outputs of the two hidden layers ("dropout in the first two
    fully-connected layers", Krizhevsky et al. 2012; Simonyan and Zisserman 2015).
    """

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float, layers: LayerFactory):
        dropout = check_dropout(dropout)
        self.fc1 = layers.linear(in_features, check_positive_int("hidden", hidden))
        self.drop1 = layers.dropout(dropout)
        self.fc2 = layers.linear(hidden, hidden)
        self.drop2 = layers.dropout(dropout)
        self.fc3 = layers.linear(hidden, num_classes)

    def __call__(self, x):
        x = self.drop1(jax.nn.relu(self.fc1(x)))
        x = self.drop2(jax.nn.relu(self.fc2(x)))
        return self.fc3(x)
