"""The training state: one pytree holding everything a step reads and writes, and what a checkpoint saves."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from convlib.ops.checks import ArgumentTypeError, check_key


class TrainState(NamedTuple):
    """step: () int32, number of updates done; params: ``nnx.State`` of the model's ``nnx.Param``s;
    rest: ``nnx.State`` of every other variable (BatchNorm statistics, RNG stream keys and counts);
    opt_state: the Optax state; key: typed PRNG key for per-step randomness (augmentation), folded with ``step``."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    key: jax.Array


def is_prng_key(x) -> bool:
    """Whether the array ``x`` holds typed PRNG keys (``jax.random.key``)."""
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: the static structure, the ``nnx.Param``s, and all other variables."""
    return nnx.split(model, nnx.Param, ...)


def check_model(model) -> nnx.Module:
    """`model` if it is an NNX module (e.g. from :func:`convlib.models.create`)."""
    if not isinstance(model, nnx.Module):
        raise ArgumentTypeError(f"model must be an nnx.Module (e.g. convlib.models.create(...)), got {model!r}")
    return model


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, key: jax.Array):
    """``(graphdef, state)`` for ``model`` at step 0; ``key``: a typed PRNG key (``jax.random.key``)."""
    check_model(model)
    if not isinstance(tx, optax.GradientTransformation):
        raise ArgumentTypeError(f"tx must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got {tx!r}")
    key = check_key("key", key)
    graphdef, params, rest = split_model(model)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), key)
