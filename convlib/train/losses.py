"""Training objectives: softmax cross-entropy on logits, and LeCun et al. (1998)'s RBF loss on squared distances."""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Loss:
    """An objective over model outputs.

    per_example: ``(outputs (N, K), labels (N,) int) -> (N,)`` losses; the training loss is their mean.
    predict: ``outputs (N, K) -> (N,)`` predicted class indices, for accuracy.
    """

    name: str
    per_example: Callable[[jax.Array, jax.Array], jax.Array]
    predict: Callable[[jax.Array], jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: (N, K), labels: (N,) int -> (N,) cross-entropy losses."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def rbf_loss(distances: jax.Array, labels: jax.Array, j: float) -> jax.Array:
    """LeCun et al. (1998), eq. 9, per example: ``E = y_c + log(exp(-j) + sum_i exp(-y_i))``.

    distances: (N, K) RBF outputs ``y_i`` (squared distances to the class prototypes; smaller is better),
    labels: (N,) int, j: positive constant that stops the penalty pushing distances of wrong classes beyond ``j``.
    Returns (N,) losses.
    """
    correct = jnp.take_along_axis(distances, labels[:, None], axis=1)[:, 0]
    competitors = jnp.concatenate([jnp.full_like(distances[:, :1], -j), -distances], axis=1)
    return correct + jax.nn.logsumexp(competitors, axis=1)


CROSS_ENTROPY = Loss("cross_entropy", softmax_cross_entropy, lambda logits: jnp.argmax(logits, axis=-1))
"""Softmax cross-entropy on logits, predicting the arg-max: the default :class:`Loss`."""


def rbf(j: float = 1.0) -> Loss:
    """The RBF objective for the faithful LeNet-5 head; the prediction is the nearest prototype."""
    if j <= 0:
        raise ValueError(f"j must be positive, got {j!r}")
    return Loss(
        f"rbf(j={j})",
        lambda distances, labels: rbf_loss(distances, labels, j),
        lambda distances: jnp.argmin(distances, axis=-1),
    )


LOSSES = ("cross_entropy", "rbf")
"""The names :func:`make_loss` takes."""


def make_loss(name: str, *, rbf_j: float = 1.0) -> Loss:
    """``"cross_entropy"`` or ``"rbf"`` (with constant ``rbf_j``)."""
    if name == "cross_entropy":
        return CROSS_ENTROPY
    if name == "rbf":
        return rbf(rbf_j)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
