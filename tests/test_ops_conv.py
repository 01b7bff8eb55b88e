"""convlib.ops.conv: hand-derived backward vs autodiff vs the NumPy loop reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from conv_configs import conv_configs, random_arrays
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from convlib import ops

pytestmark = pytest.mark.usefixtures("x64")

# float64: eps 2.2e-16 times sums of at most a few hundred terms of O(1) values.
RTOL, ATOL = 1e-10, 1e-12


def loss_and_grads(x, w, b, backward, **kwargs):
    """A non-linear scalar of the output (so cotangents are not all ones) and its gradients."""

    def loss(x, w, b):
        y = ops.conv(x, w, b, backward=backward, **kwargs)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / (y.size + 1))

    argnums = (0, 1) if b is None else (0, 1, 2)
    return jax.value_and_grad(loss, argnums)(x, w, b)


@given(conv_configs(), st.integers(0, 2**16))
def test_custom_and_textbook_match_autodiff_and_loops(config, seed):
    x_shape, w_shape, has_bias, kwargs = config
    x, w, b = random_arrays(seed, x_shape, w_shape, has_bias, kwargs["layout"])
    y = ops.conv(x, w, b, **kwargs)
    np.testing.assert_allclose(y, ops.conv_loops(x, w, b, **kwargs), rtol=RTOL, atol=ATOL)
    reference_loss, reference_grads = loss_and_grads(x, w, b, "autodiff", **kwargs)
    for backward in ("custom", "textbook"):
        value, grads = loss_and_grads(x, w, b, backward, **kwargs)
        np.testing.assert_allclose(value, reference_loss, rtol=RTOL, atol=ATOL)
        for got, want in zip(grads, reference_grads):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_weight_gradient_equals_loop_correlation_of_input_with_cotangent():
    """dE/dW[o, c, k] = sum_{n, i} x_pad[n, c, s i + d k] g[n, o, i], written out with loops."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3, 3, 2))
    g = rng.standard_normal((2, 4, 3, 5))
    kwargs = dict(stride=(3, 2), padding=((1, 0), (2, 1)), dilation=(1, 2), layout="NCHW")
    _, vjp = jax.vjp(lambda w: ops.conv(x, w, **kwargs), w)
    x_pad = np.pad(x, ((0, 0), (0, 0), (1, 0), (2, 1)))
    want = np.zeros_like(w)
    for o, c, k0, k1 in np.ndindex(*w.shape):
        for i0, i1 in np.ndindex(3, 5):
            want[o, c, k0, k1] += np.sum(x_pad[:, c, 3 * i0 + k0, 2 * i1 + 2 * k1] * g[:, o, i0, i1])
    np.testing.assert_allclose(vjp(g)[0], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=(1, 2), padding="SAME", dilation=2),
        dict(stride=3, padding=((2, -1), (0, 1)), groups=2),
        dict(padding=1, padding_mode="reflect", groups=4),
    ],
)
def test_check_grads_finite_differences(kwargs):
    rng = np.random.default_rng(1)
    x, w, b = (
        rng.standard_normal((2, 7, 6, 4)),
        rng.standard_normal((3, 3, 4 // kwargs.get("groups", 1), 4)),
        rng.standard_normal(4),
    )
    check_grads(lambda x, w, b: ops.conv(x, w, b, **kwargs), (x, w, b), order=2, modes=["rev"])


class ConvVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("custom", "textbook", "autodiff")
    def test_jit_and_eager_agree_with_loops(self, backward):
        rng = np.random.default_rng(2)
        x, w, b = rng.standard_normal((2, 8, 7, 3)), rng.standard_normal((3, 2, 3, 6)), rng.standard_normal(6)
        conv = self.variant(lambda x, w, b: ops.conv(x, w, b, stride=2, padding=(1, 0), backward=backward))
        y = conv(x, w, b)
        chex.assert_shape(y, (2, 4, 3, 6))
        np.testing.assert_allclose(y, ops.conv_loops(x, w, b, stride=2, padding=(1, 0)), rtol=RTOL, atol=ATOL)


def test_vmap_and_second_order_gradients():
    rng = np.random.default_rng(3)
    xs, w = rng.standard_normal((3, 2, 6, 6, 2)), rng.standard_normal((3, 3, 2, 4))

    def f(backward):
        per_example = jax.vmap(lambda x: jnp.sum(ops.conv(x, w, stride=2, padding=1, backward=backward) ** 2))
        return per_example(xs), jax.grad(
            lambda w_: jnp.sum(
                jax.grad(lambda x: jnp.sum(jnp.tanh(ops.conv(x, w_, stride=2, padding=1, backward=backward))))(xs[0])
                ** 2
            )
        )(w)

    for got, want in zip(f("custom"), f("autodiff")):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- edge cases


def grads(x, w, backward="custom", **kwargs):
    g = jnp.ones_like(ops.conv(x, w, **kwargs))
    _, vjp = jax.vjp(lambda x, w: ops.conv(x, w, backward=backward, **kwargs), x, w)
    return vjp(g)


def test_rows_the_stride_skips_get_zero_gradient():
    # H = 8, K = 3, stride 3: outputs read rows 0..2 and 3..5; rows 6 and 7 are never read.
    x, w = np.ones((1, 8, 8, 1)), np.ones((3, 3, 1, 1))
    dx, _ = grads(x, w, stride=3)
    assert np.all(dx[0, 6:, :, 0] == 0) and np.all(dx[0, :, 6:, 0] == 0)
    assert np.all(dx[0, :6, :6, 0] == 1)


def test_stride_larger_than_kernel_leaves_gaps():
    x, w = np.ones((1, 7, 1)), np.ones((2, 1, 1))
    dx, dw = grads(x, w, stride=3, layout="NHWC")
    np.testing.assert_array_equal(dx[0, :, 0], [1, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(dw[:, 0, 0], [2, 2])


def test_padding_larger_than_kernel():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((1, 3, 3, 2)), rng.standard_normal((2, 2, 2, 2))
    y = ops.conv(x, w, padding=4)
    assert y.shape == (1, 10, 10, 2)
    np.testing.assert_allclose(y, ops.conv_loops(x, w, padding=4), rtol=RTOL, atol=ATOL)
    for got, want in zip(grads(x, w, padding=4), grads(x, w, "autodiff", padding=4)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("backward", ["custom", "textbook"])
def test_input_narrower_than_kernel_gets_its_padding_materialised_on_cpu(layout, backward):
    """XLA:CPU's slow path for inputs narrower than the kernel is sidestepped by padding explicitly (behind an
    optimisation barrier); the sums, forward and backward, are unchanged. The primal (the forward outside
    differentiation) pads so on every platform, to stay one conv without a platform branch in its jaxpr."""
    rng = np.random.default_rng(7)
    x_shape, w_shape = ((2, 2, 3, 4), (3, 5, 4, 3)) if layout == "NHWC" else ((2, 4, 2, 3), (3, 4, 3, 5))
    x, w, g_seed = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal
    kwargs = dict(stride=(1, 2), padding=((1, 1), (3, -1)), dilation=(1, 1), layout=layout)
    forward = jax.jit(lambda x, w: ops.conv(x, w, backward=backward, **kwargs))
    gradients = jax.jit(jax.grad(lambda x, w: ops.conv(x, w, backward=backward, **kwargs).sum(), argnums=(0, 1)))
    # under differentiation, decided by the platform the program is lowered for, not by the default backend
    for platform in ("cpu", "cuda"):
        program = jax.export.export(gradients, platforms=[platform])(x, w).mlir_module()
        assert ("optimization_barrier" in program) == (platform == "cpu")
        assert "optimization_barrier" in jax.export.export(forward, platforms=[platform])(x, w).mlir_module()
    y = ops.conv(x, w, backward=backward, **kwargs)
    np.testing.assert_allclose(y, ops.conv_loops(x, w, **kwargs), rtol=RTOL, atol=ATOL)
    g = g_seed(y.shape)
    _, vjp = jax.vjp(lambda x, w: ops.conv(x, w, backward=backward, **kwargs), x, w)
    _, reference = jax.vjp(lambda x, w: ops.conv(x, w, backward="autodiff", **kwargs), x, w)
    for got, want in zip(vjp(g), reference(g)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_negative_padding_crops_and_cropped_input_gets_zero_gradient():
    x, w = np.ones((1, 6, 1)), np.ones((1, 1, 1))
    y = ops.conv(x, w, padding=((-2, -1),))
    assert y.shape == (1, 3, 1)
    dx, _ = grads(x, w, padding=((-2, -1),))
    np.testing.assert_array_equal(dx[0, :, 0], [0, 0, 1, 1, 1, 0])


@pytest.mark.parametrize("backward", ["custom", "textbook", "autodiff"])
@pytest.mark.parametrize("x_shape", [(0, 5, 5, 2), (2, 0, 5, 2)])
def test_zero_size_batch_or_spatial(backward, x_shape):
    x, w = np.ones(x_shape), np.ones((3, 3, 2, 4))
    padding = 2 if x_shape[1] == 0 else 1  # an empty spatial dim still has an output thanks to padding
    y = ops.conv(x, w, padding=padding, backward=backward)
    dx, dw = grads(x, w, backward, padding=padding)
    assert dx.shape == x.shape and dw.shape == w.shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(y, ops.conv_loops(x, w, padding=padding))


def test_depthwise_with_channel_multiplier():
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 5, 5, 3)), rng.standard_normal((3, 3, 1, 6))  # 3 groups, 2 filters each
    y = ops.conv(x, w, groups=3, padding=1)
    for c in range(3):  # output channels 2c, 2c+1 read only input channel c
        np.testing.assert_allclose(
            y[..., 2 * c : 2 * c + 2],
            ops.conv_loops(x[..., c : c + 1], w[..., 2 * c : 2 * c + 2], padding=1),
            rtol=RTOL,
            atol=ATOL,
        )
    for got, want in zip(grads(x, w, groups=3, padding=1), grads(x, w, "autodiff", groups=3, padding=1)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "dtype, tol", [(jnp.bfloat16, 4e-2), (jnp.float16, 4e-3), (jnp.float32, 1e-5), (jnp.float64, 1e-12)]
)
@pytest.mark.parametrize("backward", ["custom", "autodiff"])
def test_dtypes_keep_their_dtype_and_match_float64(dtype, tol, backward):
    """Tolerance ~ a few units of the dtype's epsilon relative to the output scale (sums of 18 terms)."""
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 6, 6, 2)), rng.standard_normal((3, 3, 2, 3)), rng.standard_normal(3)
    x_low, w_low, b_low = (jnp.asarray(a, dtype) for a in (x, w, b))
    y = ops.conv(x_low, w_low, b_low, stride=2, padding=1, backward=backward)
    assert y.dtype == dtype
    scale = np.max(np.abs(ops.conv_loops(x, w, b, stride=2, padding=1)))
    exact = ops.conv_loops(*(np.asarray(a, np.float64) for a in (x_low, w_low, b_low)), stride=2, padding=1)
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, atol=tol * scale)
    dx, dw = grads(x_low, w_low, backward, stride=2, padding=1)
    assert dx.dtype == dtype and dw.dtype == dtype


def test_mixed_dtypes_promote_and_return_gradients_in_input_dtypes():
    x, w = jnp.ones((1, 4, 4, 1), jnp.bfloat16), jnp.ones((2, 2, 1, 1), jnp.float32)
    y = ops.conv(x, w)
    assert y.dtype == jnp.float32
    dx, dw = jax.grad(lambda x, w: jnp.sum(ops.conv(x, w)), (0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_array_equal(dw, 9.0)


# --------------------------------------------------------------------------- padding semantics


@pytest.mark.parametrize("size, kernel, dilation, want", [(5, 4, 1, (1, 2)), (5, 3, 1, (1, 1)), (6, 2, 3, (1, 2))])
def test_same_padding_puts_the_extra_at_the_end(size, kernel, dilation, want):
    x, w = np.arange(size, dtype=float).reshape(1, size, 1), np.ones((kernel, 1, 1))
    y = ops.conv(x, w, padding="same", dilation=dilation)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, ops.conv_loops(x, w, padding=(want,), dilation=dilation))


def test_same_padding_with_stride_gives_ceil_output():
    y = ops.conv(np.ones((1, 7, 7, 1)), np.ones((3, 3, 1, 1)), stride=2, padding="SAME")
    assert y.shape == (1, 4, 4, 1)


@pytest.mark.parametrize(
    "mode, want",
    [
        ("reflect", [2, 1, 0, 1, 2, 3, 2, 1]),
        ("replicate", [0, 0, 0, 1, 2, 3, 3, 3]),
        ("circular", [2, 3, 0, 1, 2, 3, 0, 1]),
    ],
)
def test_padding_modes_fill_the_border_like_pytorch(mode, want):
    x = np.arange(4, dtype=float).reshape(1, 4, 1)
    y = ops.conv(x, np.ones((1, 1, 1)), padding=2, padding_mode=mode)
    np.testing.assert_array_equal(y[0, :, 0], want)


def test_convolve_flips_the_kernel():
    x = np.array([0, 0, 1, 0, 0], dtype=float).reshape(1, 5, 1)
    w = np.array([1, 2, 3], dtype=float).reshape(3, 1, 1)
    np.testing.assert_array_equal(ops.conv(x, w, padding=1)[0, :, 0], [0, 3, 2, 1, 0])
    np.testing.assert_array_equal(ops.convolve(x, w, padding=1)[0, :, 0], [0, 1, 2, 3, 0])


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("stride, padding, output_padding, groups", [(2, 1, 1, 1), (3, 0, 2, 2), (1, 1, 0, 2)])
def test_conv_transpose_is_the_adjoint_of_conv(layout, stride, padding, output_padding, groups):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((3, 3, 2, 4) if layout == "NHWC" else (4, 2, 3, 3))  # conv: 2*groups -> 4 channels
    c_in = 2 * groups
    w = w[..., : c_in // groups, :] if layout == "NHWC" else w[:, : c_in // groups]
    size = 7
    x_shape = (2, size, size, c_in) if layout == "NHWC" else (2, c_in, size, size)
    y_probe = ops.conv(np.zeros(x_shape), w, stride=stride, padding=padding, groups=groups, layout=layout)
    y = rng.standard_normal(y_probe.shape)
    out = ops.conv_transpose(y, w, stride=stride, padding=padding, output_padding=0, groups=groups, layout=layout)
    _, vjp = jax.vjp(
        lambda x: ops.conv(x, w, stride=stride, padding=padding, groups=groups, layout=layout), np.zeros(out.shape)
    )
    np.testing.assert_allclose(out, vjp(y)[0], rtol=RTOL, atol=ATOL)
    bigger = ops.conv_transpose(
        y, w, stride=stride, padding=padding, output_padding=output_padding, groups=groups, layout=layout
    )
    spatial = (slice(None),) + (
        (slice(None, out.shape[1]), slice(None, out.shape[2]))
        if layout == "NHWC"
        else (slice(None), slice(None, out.shape[2]))
    )
    if layout == "NHWC":
        assert bigger.shape[1] == out.shape[1] + output_padding
        np.testing.assert_allclose(bigger[:, : out.shape[1], : out.shape[2]], out, rtol=RTOL, atol=ATOL)
    else:
        assert bigger.shape[2] == out.shape[2] + output_padding
        np.testing.assert_allclose(bigger[:, :, : out.shape[2], : out.shape[3]], out, rtol=RTOL, atol=ATOL)
    del spatial
