"""Every JAX transformation through `backward="composable"` agrees with `backward="autodiff"` (float64), on conv,
convolve, conv_transpose, max_pool, avg_pool and whole models, swept over the configuration space with hypothesis;
`backward="custom"` refuses forward mode with one message."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_configs import conv_configs, random_arrays
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from convlib import models, nn, ops

pytestmark = pytest.mark.usefixtures("x64")

TOLERANCE = np.finfo(np.float64).eps ** 0.7  # ~1e-11: the same sums in another order, in float64


def assert_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, (a.shape, e.shape)
        scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
        np.testing.assert_allclose(a, e, rtol=TOLERANCE, atol=TOLERANCE * scale)


def _loss(f):
    return lambda *args: jnp.sum(jnp.sin(f(*args)))  # sin: second derivatives that are not zero


def _tangents(args):
    return jax.tree.map(jnp.cos, args)


def _all(args) -> tuple[int, ...]:
    return tuple(range(len(args)))


def _stacked(args):
    """Two copies of every argument along a new axis 0, the second one changed."""
    return jax.tree.map(lambda a: jnp.stack([a, jnp.cos(a)]), args)


def _linearized(f, args):
    return jax.linearize(f, *args)[1](*_tangents(args))


def _transposed(f, args):
    y, f_lin = jax.linearize(f, *args)
    return jax.linear_transpose(f_lin, *args)(jnp.cos(y))


def _vjp(f, args):
    y, pull = jax.vjp(f, *args)
    return pull(jnp.cos(y))


def _grad_of_grad(f, args):
    gradient = jax.grad(_loss(f), _all(args))
    return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in jax.tree.leaves(gradient(*a))), _all(args))(*args)


def _grad_of_jvp(f, args):
    tangent = lambda *a: jax.jvp(f, a, _tangents(args))[1]
    return jax.grad(lambda *a: jnp.sum(tangent(*a) ** 2), _all(args))(*args)


def _hvp_forward_over_reverse(f, args):
    return jax.jvp(jax.grad(_loss(f), _all(args)), args, _tangents(args))[1]


def _gauss_newton(f, args):
    """J^T (J v): a jvp, then a vjp of the same function."""
    jv = jax.jvp(f, args, _tangents(args))[1]
    return jax.vjp(f, *args)[1](jv)


TRANSFORMATIONS = {
    "jit": lambda f, args: jax.jit(f)(*args),
    "grad": lambda f, args: jax.grad(_loss(f), _all(args))(*args),
    "vjp": _vjp,
    "jvp": lambda f, args: jax.jvp(f, args, _tangents(args)),
    "linearize": _linearized,
    "linear_transpose": _transposed,
    "vmap_of_grad": lambda f, args: jax.vmap(jax.grad(_loss(f), _all(args)))(*_stacked(args)),
    "vmap_images": lambda f, args: jax.vmap(f, (0,) + (None,) * (len(args) - 1))(_stacked(args[:1])[0], *args[1:]),
    "checkpoint": lambda f, args: jax.grad(jax.checkpoint(_loss(f)), _all(args))(*args),
    "grad_of_grad": _grad_of_grad,
    "grad_of_jvp": _grad_of_jvp,
    "hvp_forward_over_reverse": _hvp_forward_over_reverse,
    "gauss_newton": _gauss_newton,
}
"""Transformations cheap enough on every argument of an op or a model."""

MATRICES = {
    "jacfwd": lambda f, args: jax.jit(jax.jacfwd(f, _all(args)))(*args),
    "jacrev": lambda f, args: jax.jit(jax.jacrev(f, _all(args)))(*args),
    "hessian": lambda f, args: jax.jit(jax.hessian(_loss(f), _all(args)))(*args),
}
"""Transformations that build whole Jacobians and Hessians (jitted: faster than op by op): on small arguments."""


def check_agrees(op, args, transformations):
    """Each transformation of `op(*args, backward="composable")` equals that of `backward="autodiff"`."""
    for name, transform in transformations.items():
        got = transform(lambda *a: op(*a, backward="composable"), args)
        want = transform(lambda *a: op(*a, backward="autodiff"), args)
        try:
            assert_close(got, want)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def _conv_case(config, seed):
    x_shape, w_shape, has_bias, kwargs = config
    x, w, b = random_arrays(seed, x_shape, w_shape, has_bias, kwargs["layout"])
    args = (x, w) if b is None else (x, w, b)
    return args, kwargs


small_convs = conv_configs(max_ndim=2).filter(lambda c: np.prod(c[0]) <= 64 and np.prod(c[1]) <= 36)
# --------------------------------------------------------------------------- ops, swept


@settings(max_examples=5)
@given(conv_configs(), st.integers(0, 2**16))
def test_conv_every_transformation(config, seed):
    args, kwargs = _conv_case(config, seed)
    check_agrees(lambda *a, backward: ops.conv(*a, backward=backward, **kwargs), args, TRANSFORMATIONS)


@settings(max_examples=4)
@given(small_convs, st.integers(0, 2**16))
def test_conv_jacobians_and_hessian(config, seed):
    args, kwargs = _conv_case(config, seed)
    check_agrees(lambda *a, backward: ops.conv(*a, backward=backward, **kwargs), args, MATRICES)


@settings(max_examples=3)
@given(small_convs, st.integers(0, 2**16))
def test_convolve_every_transformation(config, seed):
    args, kwargs = _conv_case(config, seed)
    op = lambda *a, backward: ops.convolve(*a, backward=backward, **kwargs)
    check_agrees(op, args, TRANSFORMATIONS | MATRICES)


@settings(max_examples=3)
@given(small_convs.filter(lambda c: c[3]["padding_mode"] == "zeros" and not isinstance(c[3]["padding"], str)))
def test_conv_transpose_every_transformation(config):
    """conv_transpose(y, w) with the geometry of conv(x, w) -> y: an x-shaped result, each derivative through the
    dE/dX primitive's transposes (the conv and dE/dW)."""
    x_shape, w_shape, has_bias, kwargs = config
    kwargs = {k: v for k, v in kwargs.items() if k != "padding_mode"}
    x, w, _ = random_arrays(0, x_shape, w_shape, False, kwargs["layout"])
    y = ops.conv(x, w, backward="autodiff", **kwargs)
    axes = ops.layout_axes(kwargs["layout"], len(x_shape) - 2)
    geometry = ops.make_geometry(len(axes.spatial), [w_shape[a] for a in axes.kernel_spatial], **kwargs)
    extra = [  # the output padding that gives back x's shape, where conv_transpose allows it
        h - ((o - 1) * s - lo - hi + k)
        for h, o, s, (lo, hi), k in zip(
            geometry.spatial_shape(x_shape),
            geometry.spatial_shape(y.shape),
            geometry.stride,
            geometry.padding,
            geometry.effective_kernel,
        )
    ]
    if all(e < max(s, d) for e, s, d in zip(extra, geometry.stride, geometry.dilation)):
        kwargs["output_padding"] = extra
    b = np.linspace(-1, 1, x_shape[axes.channel]) if has_bias else None
    args = (y, w) if b is None else (y, w, b)
    op = lambda *a, backward: ops.conv_transpose(*a, backward=backward, **kwargs)
    check_agrees(op, args, TRANSFORMATIONS | MATRICES)


@st.composite
def pool_cases(draw):
    """(op, x) for a max or average pool over 1 or 2 spatial dims, every option drawn; x holds ties."""
    ndim = draw(st.integers(1, 2))
    window = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    padding = tuple((draw(st.integers(0, k // 2)), draw(st.integers(0, k // 2))) for k in window)
    spatial = tuple(draw(st.integers(k, k + 3)) for k in window)
    layout = draw(st.sampled_from(["NHWC", "NCHW"]))
    batch, channels = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    x_shape = (batch, *spatial, channels) if layout == "NHWC" else (batch, channels, *spatial)
    x = np.random.default_rng(draw(st.integers(0, 2**16))).integers(-2, 3, x_shape).astype(np.float64)
    kwargs = dict(stride=stride, padding=padding, ceil_mode=draw(st.booleans()), layout=layout)
    if draw(st.booleans()):
        return lambda x, backward: ops.max_pool(x, window, backward=backward, **kwargs), x
    include = draw(st.booleans())
    return lambda x, backward: ops.avg_pool(x, window, count_include_pad=include, backward=backward, **kwargs), x


REVERSE_FIRST_ORDER = ("jit", "grad", "vjp", "vmap_of_grad", "vmap_images", "checkpoint", "jacrev")


@settings(max_examples=4)
@given(pool_cases(), st.integers(0, 2**16))
def test_pools_every_transformation(case, seed):
    """With ties, reverse mode: max pool's gradient goes to the first maximum of each window, as JAX's and PyTorch's;
    and composable's forward mode takes the tangent there too (its Jacobian is the same both ways). The rest without
    ties: JAX's forward-mode and second-order rules of `reduce_window` max pick another maximum at ties (the
    custom_vjp's second order agrees with composable there)."""
    op, x = case
    transformations = TRANSFORMATIONS | (MATRICES if x.size <= 64 else {})
    check_agrees(op, (x,), {k: t for k, t in transformations.items() if k in REVERSE_FIRST_ORDER})
    if x.size <= 64:
        f = lambda x: op(x, backward="composable")
        assert_close(jax.jacfwd(f)(x), jax.jacrev(f)(x))
    x = x + np.random.default_rng(seed).uniform(0.0, 0.5, x.shape)  # integers apart by >= 1: no ties left
    check_agrees(op, (x,), {k: t for k, t in transformations.items() if k not in REVERSE_FIRST_ORDER})


@settings(max_examples=6)
@given(small_convs, pool_cases(), st.integers(0, 2**16))
def test_check_grads_second_order_both_modes(config, pool, seed):
    args, kwargs = _conv_case(config, seed)
    check_grads(lambda *a: ops.conv(*a, backward="composable", **kwargs), args, order=2, modes=("fwd", "rev"))
    op, x = pool
    x = x + np.random.default_rng(seed).uniform(0.0, 0.5, x.shape)  # no ties: finite differences need no kinks
    check_grads(lambda x: op(x, backward="composable"), (x,), order=2, modes=("fwd", "rev"))


# --------------------------------------------------------------------------- whole models


FORWARD_OVER_REVERSE = ("jvp", "grad_of_jvp", "hvp_forward_over_reverse")


@pytest.mark.parametrize(
    ("name", "first_conv", "transformations"),
    [
        ("lenet5_modern", "conv1", TRANSFORMATIONS | MATRICES),
        ("lenet5", "c1", {name: TRANSFORMATIONS[name] for name in FORWARD_OVER_REVERSE}),  # its 16 convs in C3: slow
    ],
)
def test_model_every_transformation(name, first_conv, transformations):
    """A float64 model, its backward switched by `nn.set_backward`: each transformation on (x, parameters); the
    Jacobians and the Hessian in the first conv's bias (6 entries, through every layer's rules)."""
    model = models.create(name, in_channels=1, input_size=28, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = np.random.default_rng(0).standard_normal((2, 28, 28, 1))

    def op(x, params, backward):
        return nn.set_backward(nnx.merge(graphdef, params, rest), backward)(x)

    def through_first_bias(bias, backward):
        with_bias = jax.tree_util.tree_map_with_path(
            lambda path, a: bias if jax.tree_util.keystr(path) == f"['{first_conv}']['bias'].value" else a, params
        )
        return op(x, with_bias, backward)

    check_agrees(op, (x, params), {k: t for k, t in transformations.items() if k not in MATRICES})
    bias = getattr(model, first_conv).bias[...]
    check_agrees(through_first_bias, (bias,), {k: t for k, t in transformations.items() if k in MATRICES})


def test_gradient_runs_the_hand_derived_primitives():
    """The gradient's program holds the dE/dX and dE/dW primitives and the pools' hand-derived transposes; its one
    JAX conv is the forward's (the rules are the lecture's, not JAX's)."""
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

    def loss(x, w):
        y = ops.conv(x, w, padding=1, backward="composable")
        y = ops.max_pool(y, 2, backward="composable") + ops.avg_pool(y, 2, backward="composable")
        return jnp.sum(y**2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w))
    for primitive in (
        "convlib_conv_input_gradient",
        "convlib_conv_weight_gradient",
        "convlib_max_pool_switches_transpose",
        "convlib_avg_pool_transpose",
    ):
        assert primitive in jaxpr
    assert jaxpr.count("conv_general_dilated[") == 1


def test_model_created_with_composable_backward():
    model = nnx.eval_shape(lambda: models.create("lenet5", in_channels=1, rngs=nnx.Rngs(0), backward="composable"))
    assert {m.backward for _, m in nnx.iter_modules(model) if isinstance(m, nn.backward.LAYERS)} == {"composable"}


# --------------------------------------------------------------------------- custom_vjp: one message


@pytest.mark.parametrize(
    "op",
    [
        lambda x, backward: ops.conv(x, jnp.ones((3, 3, 2, 2)), backward=backward),
        lambda x, backward: ops.max_pool(x, 2, backward=backward),
        lambda x, backward: ops.avg_pool(x, 2, backward=backward),
    ],
)
@pytest.mark.parametrize("backward", ["custom", "textbook"])
def test_forward_mode_on_custom_vjp_names_the_modes_that_support_it(op, backward):
    x = jnp.ones((1, 4, 4, 2))
    f = lambda x: op(x, backward)
    message = rf"backward='{backward}' is a custom_vjp.*\('composable', 'autodiff'\)"
    for forward_mode in (
        lambda: jax.jvp(f, (x,), (x,)),
        lambda: jax.jacfwd(f)(x),
        lambda: jax.grad(lambda x: jnp.sum(jax.jvp(f, (x,), (x,))[1]))(x),
    ):
        with pytest.raises(TypeError, match=message):
            forward_mode()


# --------------------------------------------------------------------------- shard_map on 4 devices

SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from convlib import ops

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((8, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4)

    def loss(x, w, b, backward):
        y = ops.conv(x, w, b, stride=2, padding=1, backward=backward)
        y = ops.max_pool(y, 2, 1, backward=backward) + ops.avg_pool(y, 2, 1, backward=backward)
        y = ops.conv_transpose(y, w, stride=2, padding=1, output_padding=1, backward=backward)
        return jnp.sum(jnp.sin(ops.convolve(y, w, padding=1, backward=backward)))

    def sharded(transform, backward):
        f = lambda x, w, b: transform(lambda w, b: loss(x, w, b, backward), (w, b))
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P()))(x, w, b)

    def psummed(fn):
        return lambda f, args: jax.tree.map(lambda a: jax.lax.psum(a, "data"), fn(f, args))

    mesh = Mesh(np.array(jax.devices()), ("data",))
    transforms = {
        "grad": lambda f, args: jax.grad(f, (0, 1))(*args),
        "hvp": psummed(lambda f, args: jax.jvp(jax.grad(f, (0, 1)), args, args)[1]),
        "jvp": psummed(lambda f, args: jax.jvp(f, args, args)[1]),
        "grad_of_jvp": lambda f, args: jax.grad(lambda *a: jax.jvp(f, a, args)[1] ** 2, (0, 1))(*args),
    }
    errors = {}
    for name, transform in transforms.items():
        got, want = sharded(transform, "composable"), sharded(transform, "autodiff")
        errors[name] = max(float(np.max(np.abs(np.asarray(g) - np.asarray(h)) / (1 + np.abs(np.asarray(h)))))
                           for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    print(json.dumps(errors))
    """
)


def test_shard_map_on_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(errors) == {"grad", "hvp", "jvp", "grad_of_jvp"}
    assert max(errors.values()) < TOLERANCE, errors
