"""`backward="composable"`: the lecture's formulas as the transpose rules of convlib primitives, so that every JAX
transformation composes with the hand-derived backward.

A `custom_vjp` (``backward="custom"``) gives JAX a VJP and nothing else: no JVP, hence no forward mode. JAX itself
makes `lax.conv_general_dilated` compose with everything as a *bilinear* primitive with two transpose rules
(`jax/_src/lax/convolution.py`). The lecture's two formulas are exactly those rules, and each is again bilinear, so
three primitives close the algebra (`Y = X (*) W`, `G = dE/dY`):

    conv(X, W)             = X (*) W                      transposes: dX(G, W) for X,  dW(X, G) for W
    dX(G, W)  = dE/dX      = G_s (*) rot180(W)  (full)    transposes: conv(C, W) for G, dW(C, G) for W
    dW(X, G)  = dE/dW      = X (*) G                      transposes: dX(G, C) for X,   conv(X, C) for G

(`C` the cotangent of the primitive's output). Registered with `ad.defbilinear`, each primitive's JVP is the sum of
two binds of itself, and its transposes are the other two: backprop through a conv layer is a conv layer, to any
order. The conv lowers to one plain `lax.conv_general_dilated`; dX and dW lower to the textbook formulas
(:mod:`convlib.ops.textbook`), on a CPU to the formulations the plan measured fastest (:mod:`convlib.ops.plan`),
shared with the `custom_vjp` path. The public ops do not bind the conv primitive for the forward: a `custom_jvp` keeps
the primal every mode runs (one `conv_general_dilated`, :func:`convlib.ops.textbook.single_conv`, what a jaxpr of
the forward shows) and binds the primitives for its JVP, so every derivative, of any order, runs them; a derivative's
jaxpr shows them as themselves (`convlib_conv`, `convlib_conv_input_gradient`, `convlib_conv_weight_gradient`).

Pools are linear maps of the tangent: average pooling is linear, and max pooling's JVP takes each window's tangent
at its first maximum (the switches). :func:`linear_pair` builds two linear primitives, each the other's transpose,
from a hand-derived map and its hand-derived adjoint (:mod:`convlib.ops.pool` uses it).

Batching: an axis mapped over images folds into the batch axis (axis 0 in every layout); a mapped kernel, or a mapped
operand of dW (whose batch is contracted), runs the primitive once per slice with `lax.map` (correct, not fast).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from convlib.ops import plan, textbook
from convlib.ops.geometry import Geometry

FORWARD_MODES = ("composable", "autodiff")
"""The values of `backward=` that JAX can differentiate in forward mode."""


@contextlib.contextmanager
def forward_mode_hint(backward: str) -> Iterator[None]:
    """Re-raises JAX's error for forward-mode differentiation of a `custom_vjp` (raised where the op is called under
    `jvp`, `jacfwd`, `hessian` or `grad` of `jvp`) as one line naming `backward=` and the modes that support it."""
    try:
        yield
    except (TypeError, NotImplementedError) as error:
        if "custom_vjp" not in str(error) and "custom_lin" not in str(error):
            raise
        raise TypeError(
            f"backward={backward!r} is a custom_vjp, which JAX cannot differentiate in forward mode (jvp, jacfwd, "
            f"hessian, linearize, grad of jvp); use backward= one of {FORWARD_MODES}"
        ) from None


# --------------------------------------------------------------------------- the operations


def _conv(x, w, *, geometry: Geometry):
    """Y = X (*) W, one `conv_general_dilated` as the primal of every mode (no bias: it is added outside, by JAX)."""
    return textbook.forward(geometry, x, w, None, conv=textbook.single_conv)


def _input_gradient(g, w, *, geometry: Geometry, in_spatial, formulation=plan.DX_TEXTBOOK):
    """dE/dX of a conv of input spatial shape `in_spatial` (zeros when nothing flows back)."""
    if g.size == 0:
        return jnp.zeros(geometry.input_shape(g.shape, w.shape, in_spatial), jnp.result_type(g, w))
    return formulation(geometry, g, w, in_spatial)


def _weight_gradient(x, g, *, geometry: Geometry, kernel_shape, formulation=plan.DW_TEXTBOOK):
    """dE/dW of a conv of kernel shape `kernel_shape` (zeros when nothing flows back)."""
    if x.size == 0 or g.size == 0:
        return jnp.zeros(kernel_shape, jnp.result_type(x, g))
    return formulation(geometry, x, g, kernel_shape)


def _cpu_formulas(geometry: Geometry, x_shape, w_shape, g_shape) -> plan.Formulas:
    """The CPU plan's dX and dW formulations for this conv, or the textbook's where the plan lowers the conv into
    smaller ones (that lowering computes dX and dW together) or `G` is not the conv's whole output (the output
    padding of a transposed conv)."""
    formulas = plan.plan(geometry, x_shape, w_shape, "cpu")
    whole = geometry.output_spatial(geometry.spatial_shape(x_shape)) == geometry.spatial_shape(g_shape)
    return formulas if isinstance(formulas, plan.Formulas) and whole else plan.TEXTBOOK


def _cpu_input_gradient(g, w, *, geometry: Geometry, in_spatial):
    formulas = _cpu_formulas(geometry, geometry.input_shape(g.shape, w.shape, in_spatial), w.shape, g.shape)
    return _input_gradient(g, w, geometry=geometry, in_spatial=in_spatial, formulation=formulas.input_gradient)


def _cpu_weight_gradient(x, g, *, geometry: Geometry, kernel_shape):
    formulas = _cpu_formulas(geometry, x.shape, kernel_shape, g.shape)
    return _weight_gradient(x, g, geometry=geometry, kernel_shape=kernel_shape, formulation=formulas.weight_gradient)


# --------------------------------------------------------------------------- primitives


def _same_varying_axes(*arrays):
    """The arrays cast to vary over the union of their `shard_map` mesh axes (JAX's own primitives do so when bound):
    a replicated kernel meeting a batch shard becomes varying, and the transpose of that cast sums its gradient
    over the devices."""
    varying = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    union = frozenset().union(*varying)
    return [a if v == union else lax.pcast(a, tuple(sorted(union - v)), to="varying") for a, v in zip(arrays, varying)]


def _bind(primitive: Primitive, *operands, **params):
    return primitive.bind(*_same_varying_axes(*operands), **params)


def _abstract_eval(fn: Callable):
    """The output aval of `fn`, traced abstractly, varying over the operands' mesh axes."""

    def abstract_eval(*avals, **params):
        out = jax.eval_shape(functools.partial(fn, **params), *avals)
        return avals[0].update(shape=out.shape, dtype=out.dtype, weak_type=False)

    return abstract_eval


def _primitive(name: str, fn: Callable, cpu_fn: Callable | None = None) -> Primitive:
    """A primitive computing `fn(*operands, **params)` (lowered from it; on a CPU from `cpu_fn`)."""
    primitive = Primitive(name)
    primitive.def_impl(fn)
    primitive.def_abstract_eval(_abstract_eval(fn))
    mlir.register_lowering(primitive, mlir.lower_fun(fn, multiple_results=False))
    if cpu_fn is not None:
        mlir.register_lowering(primitive, mlir.lower_fun(cpu_fn, multiple_results=False), platform="cpu")
    return primitive


conv_p = _primitive("convlib_conv", _conv)
input_gradient_p = _primitive("convlib_conv_input_gradient", _input_gradient, _cpu_input_gradient)
weight_gradient_p = _primitive("convlib_conv_weight_gradient", _weight_gradient, _cpu_weight_gradient)


def _spatial(geometry: Geometry, operand) -> tuple[int, ...]:
    return geometry.spatial_shape(operand.aval.shape)


def _cropped_conv(x, w, geometry: Geometry, out_shape):
    """conv(x, w) cut to `out_shape`: the adjoint of dX and dW for a `G` shorter than the conv's output (a
    transposed conv's output padding makes the input longer than `G` needs)."""
    y = _bind(conv_p, x, w, geometry=geometry)
    return y if y.shape == tuple(out_shape) else lax.slice(y, (0,) * y.ndim, out_shape)


ad.defbilinear(
    conv_p,
    lambda c, x, w, *, geometry: _bind(input_gradient_p, c, w, geometry=geometry, in_spatial=_spatial(geometry, x)),
    lambda c, x, w, *, geometry: _bind(weight_gradient_p, x, c, geometry=geometry, kernel_shape=w.aval.shape),
)
ad.defbilinear(
    input_gradient_p,
    lambda c, g, w, *, geometry, in_spatial: _cropped_conv(c, w, geometry, g.aval.shape),
    lambda c, g, w, *, geometry, in_spatial: _bind(
        weight_gradient_p, c, g, geometry=geometry, kernel_shape=w.aval.shape
    ),
)
ad.defbilinear(
    weight_gradient_p,
    lambda c, x, g, *, geometry, kernel_shape: _bind(
        input_gradient_p, g, c, geometry=geometry, in_spatial=_spatial(geometry, x)
    ),
    lambda c, x, g, *, geometry, kernel_shape: _cropped_conv(x, c, geometry, g.aval.shape),
)


# --------------------------------------------------------------------------- batching


def _fold_into_batch(primitive: Primitive, image: int):
    """The batching rule that folds a mapped axis of operand `image` (alone mapped) into its batch axis 0 and splits
    it out of the output's; anything else runs by :func:`_map_slices`."""

    def rule(operands, dims, **params):
        if any(d is not None for i, d in enumerate(dims) if i != image):
            return _map_slices(primitive, operands, dims, **params)
        a = jnp.moveaxis(operands[image], dims[image], 0)
        size, batch = a.shape[:2]
        operands = list(operands)
        operands[image] = a.reshape(size * batch, *a.shape[2:])
        y = _bind(primitive, *operands, **params)
        return y.reshape(size, batch, *y.shape[1:]), 0

    return rule


def _map_slices(primitive: Primitive, operands, dims, **params):
    """The primitive once per slice of the mapped axis, by `lax.map`: the unmapped operands are shared."""
    mapped = {i: jnp.moveaxis(a, d, 0) for i, (a, d) in enumerate(zip(operands, dims)) if d is not None}

    def one(slices):
        return _bind(primitive, *(slices.get(i, a) for i, a in enumerate(operands)), **params)

    return lax.map(one, mapped), 0


batching.primitive_batchers[conv_p] = _fold_into_batch(conv_p, image=0)
batching.primitive_batchers[input_gradient_p] = _fold_into_batch(input_gradient_p, image=0)
batching.primitive_batchers[weight_gradient_p] = functools.partial(_map_slices, weight_gradient_p)


def _with_plain_primal(primitive: Primitive, plain: Callable) -> Callable:
    """`f(a, b, **params)`: `plain(a, b, **params)` outside differentiation, what a jaxpr of the forward shows (in a
    `custom_jvp_call`); its JVP binds the bilinear `primitive`, `P(da, b) + P(a, db)`, so every derivative of every
    order runs the hand-derived primitives and their transposes."""

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def f(a, b, params):
        return plain(a, b, **dict(params))

    @functools.partial(f.defjvp, symbolic_zeros=True)
    def f_jvp(params, primals, tangents):
        (a, b), (da, db) = primals, tangents
        y = f(a, b, params)  # itself, so that a derivative of the primal takes this rule again
        terms = [
            _bind(primitive, *operands, **dict(params))
            for operands, tangent in (((da, b), da), ((a, db), db))
            if type(tangent) is not SymbolicZero
        ]
        return y, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)

    return lambda a, b, **params: f(a, b, tuple(sorted(params.items())))


_conv_plain_primal = _with_plain_primal(conv_p, _conv)
_input_gradient_plain_primal = _with_plain_primal(input_gradient_p, _input_gradient)


def forward(geometry: Geometry, x, w, b):
    """`X (*) W + b` whose derivatives are the `convlib_conv` primitive's (x, w, b: promoted, x explicitly padded;
    see :func:`convlib.ops.conv`): a :class:`~convlib.ops.formulation.ForwardFormula`."""
    x, w = _same_varying_axes(x, w)
    y = _conv_plain_primal(x, w, geometry=geometry)
    return y if b is None else y + b.reshape(geometry.axes.bias_shape(b.shape[0]))


def input_gradient(geometry: Geometry, g, w, in_spatial):
    """dE/dX whose derivatives are the `convlib_conv_input_gradient` primitive's, :func:`convlib.ops.conv_transpose`'s
    composable form: an :class:`~convlib.ops.formulation.InputGradientFormula`."""
    g, w = _same_varying_axes(g, w)
    return _input_gradient_plain_primal(g, w, geometry=geometry, in_spatial=tuple(in_spatial))


# --------------------------------------------------------------------------- linear pairs (pools)


def linear_pair(name: str, forward: Callable, adjoint: Callable) -> tuple[Callable, Callable]:
    """Two linear primitives, each the other's transpose: `forward(t, *consts, **params)` and
    `adjoint(c, *consts, **params)`, linear in their first operand, constant in the others (their derivative in
    the consts is zero, as a max pool's switches are almost everywhere). Every operand is an image batch: a mapped
    axis folds into axis 0. Returns the two bind functions, with the same signatures."""
    primitives = [_primitive(f"convlib_{name}", forward), _primitive(f"convlib_{name}_transpose", adjoint)]
    for primitive, other in zip(primitives, reversed(primitives)):
        ad.primitive_jvps[primitive] = functools.partial(_linear_jvp, primitive)
        ad.primitive_transposes[primitive] = functools.partial(_linear_transpose, other)
        batching.primitive_batchers[primitive] = functools.partial(_fold_all_into_batch, primitive)
    return tuple(functools.partial(_bind, primitive) for primitive in primitives)


def _linear_jvp(primitive: Primitive, primals, tangents, **params):
    """The primitive applied to the tangent of its linear operand (the consts' tangents contribute nothing)."""
    t, *consts = primals
    tangent = ad.instantiate_zeros(tangents[0])
    return _bind(primitive, t, *consts, **params), _bind(primitive, tangent, *consts, **params)


def _linear_transpose(other: Primitive, c, t, *consts, **params):
    if type(c) is ad.Zero:
        return [ad.Zero(t.aval.to_ct_aval())] + [None] * len(consts)
    return [_bind(other, c, *consts, **params)] + [None] * len(consts)


def _fold_all_into_batch(primitive: Primitive, operands, dims, **params):
    size = next(a.shape[d] for a, d in zip(operands, dims) if d is not None)
    batch = next(a.shape[1 if d == 0 else 0] for a, d in zip(operands, dims))
    folded = []
    for a, d in zip(operands, dims):
        a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        folded.append(a.reshape(size * batch, *a.shape[2:]))
    y = _bind(primitive, *folded, **params)
    return y.reshape(size, batch, *y.shape[1:]), 0
