"""The lecture's three implementations agree; receptive-field arithmetic against hand-computed values."""

import jax
import numpy as np
import pytest
from conv_configs import conv_configs, random_arrays
from hypothesis import given, settings
from hypothesis import strategies as st

from convlib import ops

pytestmark = pytest.mark.usefixtures("x64")


@settings(max_examples=20)
@given(conv_configs(), st.integers(0, 2**16))
def test_loops_im2col_and_lax_agree(config, seed):
    x_shape, w_shape, has_bias, kwargs = config
    x, w, b = random_arrays(seed, x_shape, w_shape, has_bias, kwargs["layout"])
    want = ops.conv_by("loops", x, w, b, **kwargs)
    for method in ("im2col", "lax"):
        np.testing.assert_allclose(ops.conv_by(method, x, w, b, **kwargs), want, rtol=1e-10, atol=1e-12)


def test_im2col_is_differentiable_and_matches_conv_gradients():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 7, 7, 4)), rng.standard_normal((3, 3, 2, 6))
    kwargs = dict(stride=2, padding=1, groups=2, dilation=(1, 2))
    grads = [jax.grad(lambda x, w: (f(x, w, **kwargs) ** 2).sum(), (0, 1))(x, w) for f in (ops.conv_im2col, ops.conv)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def stack(*layers):
    return [ops.make_geometry(1, k, stride=s, padding=p, dilation=d) for k, s, p, d in layers]


@pytest.mark.parametrize(
    "layers, size, jump, start",
    [
        (stack((3, 1, 1, 1), (3, 1, 1, 1)), 5, 1, 0.0),  # two 3x3 convs see 5x5
        (stack((3, 1, 1, 1), (3, 1, 1, 1), (3, 1, 1, 1)), 7, 1, 0.0),  # three: 7x7, as one 7x7 (VGG)
        (stack((3, 1, 1, 1), (3, 1, 2, 2), (3, 1, 4, 4)), 15, 1, 0.0),  # dilations 1, 2, 4
        (stack((5, 1, 0, 1), (2, 2, 0, 1), (5, 1, 0, 1), (2, 2, 0, 1)), 16, 4, 7.5),  # LeNet-5 C1 S2 C3 S4
        (stack((11, 4, 2, 1), (3, 2, 0, 1)), 19, 8, 7.0),  # AlexNet conv1 + pool1
        (stack((7, 2, 3, 1), (3, 2, 1, 1)), 11, 4, 0.0),  # ResNet stem
    ],
)
def test_receptive_field_against_hand_computed_values(layers, size, jump, start):
    field = ops.receptive_field(layers)
    assert field.size == (size,) and field.jump == (jump,) and field.start == (start,)


def test_dilated_context_module_grows_exponentially():
    layers = [ops.make_geometry(2, 3, dilation=d, padding=d) for d in (1, 1, 2, 4, 8, 16, 1)]
    layers.append(ops.make_geometry(2, 1))
    assert [f.size[0] for f in ops.receptive_fields(layers)] == [3, 5, 9, 17, 33, 65, 67, 67]


def test_receptive_field_matches_gradient_support():
    """Empirical check: the nonzero support of d y[center] / d x equals the analytic size."""
    specs = [dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(stride=1, padding=0)]
    layers = [ops.make_geometry(1, 3, **s) for s in specs]
    ws = [np.ones((3, 1, 1)) for _ in specs]

    def net(x):
        for w, s in zip(ws, specs):
            x = ops.conv(x, w, **s)
        return x

    x = np.ones((1, 64, 1))
    y = net(x)
    grad = jax.grad(lambda x: net(x)[0, y.shape[1] // 2, 0])(x)[0, :, 0]
    support = np.flatnonzero(grad)
    field = ops.receptive_field(layers)
    assert support[-1] - support[0] + 1 == field.size[0]
    assert support[0] + (field.size[0] - 1) / 2 == field.start[0] + field.jump[0] * (y.shape[1] // 2)


def test_receptive_field_rejects_bad_stacks():
    with pytest.raises(ValueError, match="at least one Geometry"):
        ops.receptive_field([])
    with pytest.raises(ValueError, match=r"layers\[1\] must be a Geometry with 1 spatial dims"):
        ops.receptive_field([ops.make_geometry(1, 3), ops.make_geometry(2, 3)])
