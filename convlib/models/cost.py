"""Model size and cost from abstract shapes: trainable parameters and FLOPs per image.

FLOPs count the multiply-adds of convolutions and matrix products (2 FLOPs per
multiply-add), read from the forward pass's jaxpr traced with abstract shapes
(nothing is allocated or computed). Element-wise work (bias, BatchNorm,
activations, pooling, LRN) is not counted; this is the convention of the
papers, which quote multiply-adds (ResNet-50: "3.8 x 10^9 FLOPs" = MACs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core

from convlib.models.registry import create


def param_count(model_or_state) -> int:
    """Number of trainable parameters (`nnx.Param` entries) of a module or an `nnx.State`.

    Works on abstract models from `nnx.eval_shape`. Fixed variables (BatchNorm
    statistics, LeNet-5's RBF prototypes) are not counted.
    """
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def abstract_model(name: str, **options) -> nnx.Module:
    """`create(name, **options)` with abstract parameters (shapes only), in eval mode; `rngs` defaults to seed 0."""
    rngs = options.pop("rngs", None) or nnx.Rngs(0)
    model = nnx.eval_shape(lambda rngs: create(name, rngs=rngs, **options), rngs)
    model.eval()
    return model


def _multiply_adds(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            # One branch runs. The per-platform formulations of one conv (`lax.platform_dependent`) compute the
            # same sums, some with extra products with zero (space-to-depth): the fewest are the layer's.
            total += min(_multiply_adds(branch.jaxpr) for branch in eqn.params["branches"])
            continue
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
            per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
            total += math.prod(eqn.outvars[0].aval.shape) * per_output
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    total += _multiply_adds(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    total += _multiply_adds(sub)
    return total


def flops(model_or_name, input_shape, **options) -> int:
    """FLOPs (2 x multiply-adds of convs and dense layers) of one forward pass on one image.

    Args:
      model_or_name: an NNX module (concrete or from `nnx.eval_shape`), or a
        registry name built abstractly with `options` (e.g. `input_size`).
      input_shape: one image, (H, W, C); a name gets `in_channels = C` unless given.
    """
    model = model_or_name
    if isinstance(model_or_name, str):
        options.setdefault("in_channels", input_shape[-1])
        model = abstract_model(model_or_name, **options)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    return 2 * _multiply_adds(jaxpr.jaxpr)
