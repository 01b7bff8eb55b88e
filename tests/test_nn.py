"""convlib.nn: the layers agree with the ops they wrap, LRN with its formula, dtypes and argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import nn, ops


def rngs(seed=0):
    # RBG keys: XLA's RngBitGenerator compiles far faster on CPU than threefry.
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def normal(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# --------------------------------------------------------------------------- Conv


@pytest.mark.parametrize(
    "kernel_size, x_shape, kwargs",
    [
        (3, (2, 9, 8, 4), dict(stride=2, padding=1, groups=2)),
        ((3, 2), (1, 7, 6, 4), dict(dilation=(2, 1), padding="SAME")),
        ((5,), (2, 11, 3), dict(stride=3, padding=((2, 1),))),
        ((2, 3, 2), (1, 5, 6, 4, 2), dict(padding="VALID", use_bias=False)),
        (3, (1, 6, 6, 2), dict(padding=1, padding_mode="reflect")),
    ],
)
def test_conv_matches_ops_conv(kernel_size, x_shape, kwargs):
    c_in = x_shape[-1]
    use_bias = kwargs.pop("use_bias", True)
    layer = nn.Conv(c_in, 4, kernel_size, use_bias=use_bias, rngs=rngs(), **kwargs)
    x = normal(x_shape)
    bias = layer.bias[...] if use_bias else None
    expected = ops.conv(x, layer.kernel[...], bias, **kwargs)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert layer.output_spatial(x_shape[1:-1]) == expected.shape[1:-1]


def test_conv_kernel_is_stored_in_the_ops_layout():
    nhwc = nn.Conv(6, 4, (3, 5), groups=2, rngs=rngs())
    nchw = nn.Conv(6, 4, (3, 5), groups=2, layout="NCHW", rngs=rngs())
    assert nhwc.kernel.shape == (3, 5, 3, 4)
    assert nchw.kernel.shape == (4, 3, 3, 5)
    x = normal((2, 6, 7, 9))
    expected = ops.conv(x, nchw.kernel[...], nchw.bias[...], groups=2, layout="NCHW")
    np.testing.assert_allclose(nchw(x), expected, rtol=1e-6, atol=1e-6)


def test_conv_int_kernel_uses_ndim():
    assert nn.Conv(2, 3, 3, ndim=1, rngs=rngs()).kernel.shape == (3, 2, 3)
    assert nn.Conv(2, 3, 3, ndim=3, rngs=rngs()).kernel.shape == (3, 3, 3, 2, 3)
    assert nn.Conv(2, 3, 3, rngs=rngs()).kernel.shape == (3, 3, 2, 3)


def test_conv_default_init_is_he_normal():
    layer = nn.Conv(64, 256, 3, groups=2, rngs=rngs())
    fan_in = 3 * 3 * 64 // 2
    std = float(jnp.std(layer.kernel[...]))
    assert abs(std - math.sqrt(2.0 / fan_in)) < 0.05 * math.sqrt(2.0 / fan_in)
    assert not jnp.any(layer.bias[...])


def test_conv_mixed_precision():
    layer = nn.Conv(3, 4, 3, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs())
    assert layer.kernel.dtype == jnp.float32 and layer.bias.dtype == jnp.float32
    x = normal((1, 6, 6, 3))
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    expected = ops.conv(
        x.astype(jnp.bfloat16), layer.kernel[...].astype(jnp.bfloat16), layer.bias[...].astype(jnp.bfloat16)
    )
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))
    # dtype None: computed in the promoted dtype of input and parameters.
    half = nn.Conv(3, 4, 3, param_dtype=jnp.bfloat16, rngs=rngs())
    assert half(x).dtype == jnp.float32
    assert half(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    # Gradients reach the float32 parameters in float32.
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(layer)
    assert grads["kernel"].dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(in_features=0), "in_features"),
        (dict(out_features=2.5), "out_features"),
        (dict(groups=3), "groups"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=(3, 0)), "kernel_size"),
        (dict(kernel_size=(3, 3, 3, 3)), "kernel_size"),
        (dict(kernel_size=(3, 3), ndim=1), "ndim"),
        (dict(stride=0), "stride"),
        (dict(dilation=(1, 0)), "dilation"),
        (dict(padding="FULL"), "padding"),
        (dict(padding=(1, 2, 3)), "padding"),
        (dict(padding_mode="mirror"), "padding_mode"),
        (dict(layout="NWHC"), "layout"),
        (dict(backward="numeric"), "backward"),
    ],
)
def test_conv_bad_arguments_name_the_parameter(kwargs, name):
    args = dict(in_features=4, out_features=8, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=name):
        nn.Conv(**args, rngs=rngs())


def test_conv_gradients_custom_equal_autodiff():
    layers = {
        b: nn.Conv(4, 6, 3, stride=2, padding=1, groups=2, dilation=2, backward=b, rngs=rngs())
        for b in ("custom", "autodiff")
    }
    x = normal((2, 9, 9, 4))

    def loss(layer, x):
        return jnp.sum(jnp.sin(layer(x)))

    grads = {b: nnx.grad(loss, argnums=(0, 1))(layer, x) for b, layer in layers.items()}
    for got, want in zip(jax.tree.leaves(grads["custom"]), jax.tree.leaves(grads["autodiff"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- pools


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_pools_match_ops(layout):
    x = normal((2, 7, 9, 3) if layout == "NHWC" else (2, 3, 7, 9))
    max_pool = nn.MaxPool(3, 2, 1, ceil_mode=True, layout=layout)
    avg_pool = nn.AvgPool((3, 2), (2, 1), ((1, 0), (1, 1)), count_include_pad=False, layout=layout)
    expected_max = ops.max_pool(x, 3, 2, 1, ceil_mode=True, layout=layout)
    expected_avg = ops.avg_pool(x, (3, 2), (2, 1), ((1, 0), (1, 1)), count_include_pad=False, layout=layout)
    np.testing.assert_array_equal(max_pool(x), expected_max)
    np.testing.assert_allclose(avg_pool(x), expected_avg, rtol=1e-6)
    spatial = (7, 9)
    out_axes = slice(1, -1) if layout == "NHWC" else slice(2, None)
    assert max_pool.output_spatial(spatial) == expected_max.shape[out_axes]
    assert avg_pool.output_spatial(spatial) == expected_avg.shape[out_axes]


def test_global_avg_pool_is_the_spatial_mean():
    x = normal((2, 5, 6, 3))
    np.testing.assert_allclose(nn.GlobalAvgPool()(x), jnp.mean(x, axis=(1, 2)), rtol=1e-6)
    x_nchw = jnp.moveaxis(x, -1, 1)
    np.testing.assert_allclose(nn.GlobalAvgPool(layout="NCHW")(x_nchw), jnp.mean(x, axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: nn.MaxPool(0), "window"),
        (lambda: nn.AvgPool((2, -1)), "window"),
        (lambda: nn.MaxPool(2, stride=(1, 0)), "stride"),
        (lambda: nn.AvgPool(2, padding="FULL"), "padding"),
        (lambda: nn.AvgPool(2, backward="fast"), "backward"),
        (lambda: nn.MaxPool(2, layout="CHW"), "layout"),
        (lambda: nn.GlobalAvgPool(backward=None), "backward"),
    ],
)
def test_pool_bad_arguments_name_the_parameter(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_backward_switch_reaches_every_layer():
    model = nnx.Sequential(nn.Conv(2, 2, 3, rngs=rngs()), nn.MaxPool(2), nn.AvgPool(2), nn.GlobalAvgPool())
    model.set_attributes(backward="autodiff")
    assert [layer.backward for layer in model.layers] == ["autodiff"] * 4


# --------------------------------------------------------------------------- LRN


def lrn_loop(a, n, k, alpha, beta):
    """The paper's formula, one activity at a time: a (N, H, W, C)."""
    a = np.asarray(a, np.float64)
    b = np.empty_like(a)
    channels = a.shape[-1]
    for index in np.ndindex(a.shape[:-1]):
        for i in range(channels):
            window = range(max(0, i - n // 2), min(channels - 1, i + n // 2) + 1)
            energy = sum(a[index + (j,)] ** 2 for j in window)
            b[index + (i,)] = a[index + (i,)] / (k + alpha * energy) ** beta
    return b


@pytest.mark.parametrize("n, k, alpha, beta", [(5, 2.0, 1e-4, 0.75), (3, 1.0, 0.5, 0.5), (1, 0.5, 2.0, 1.0)])
def test_lrn_matches_the_formula(n, k, alpha, beta):
    x = 3.0 * normal((2, 3, 2, 7))
    layer = nn.LocalResponseNorm(n, alpha=alpha, beta=beta, k=k)
    np.testing.assert_allclose(layer(x), lrn_loop(x, n, k, alpha, beta), rtol=1e-5)


def test_lrn_defaults_are_alexnets_and_nchw_agrees():
    layer = nn.LocalResponseNorm()
    assert (layer.size, layer.k, layer.alpha, layer.beta) == (5, 2.0, 1e-4, 0.75)
    x = 10.0 * normal((1, 4, 4, 6))
    nchw = nn.LocalResponseNorm(layout="NCHW")(jnp.moveaxis(x, -1, 1))
    np.testing.assert_allclose(jnp.moveaxis(nchw, 1, -1), layer(x), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, name", [(dict(size=0), "size"), (dict(alpha=-1.0), "alpha"), (dict(beta="x"), "beta"), (dict(k=0.0), "k")]
)
def test_lrn_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        nn.LocalResponseNorm(**kwargs)
