"""Optional cross-check against PyTorch (skipped when torch is not installed; never a dependency)."""

import jax
import numpy as np
import pytest
from conv_configs import conv_configs, random_arrays
from hypothesis import given, settings
from hypothesis import strategies as st

from convlib import ops

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("x64")
F = torch.nn.functional


@settings(max_examples=20)
@given(conv_configs(), st.integers(0, 2**16))
def test_conv_and_its_gradients_match_pytorch(config, seed):
    x_shape, w_shape, has_bias, kwargs = config
    if kwargs["layout"] != "NCHW" or 0 in x_shape:
        return
    x, w, b = random_arrays(seed, x_shape, w_shape, has_bias, "NCHW")
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    ty = torch_conv(tx, tw, tb, kwargs)
    y, vjp = jax.vjp(lambda x, w: ops.conv(x, w, b, **kwargs), x, w)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = np.random.default_rng(seed).standard_normal(y.shape)
    ty.backward(torch.from_numpy(g))
    dx, dw = vjp(g)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-10, atol=1e-12)


def torch_conv(tx, tw, tb, kwargs):
    """PyTorch's conv in NCHW with the same arguments; the padding applied explicitly with F.pad."""
    ndim = tx.ndim - 2
    geometry = ops.make_geometry(
        ndim,
        tuple(tw.shape[2:]),
        stride=kwargs["stride"],
        padding=kwargs["padding"],
        dilation=kwargs["dilation"],
        in_spatial=tuple(tx.shape[2:]),
    )
    mode = {"zeros": "constant", "replicate": "replicate", "reflect": "reflect", "circular": "circular"}[
        kwargs["padding_mode"]
    ]
    t = tx
    pads = [p for lo_hi in reversed(geometry.padding) for p in lo_hi]
    if any(pads):
        t = F.pad(t, pads, mode=mode)
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    return conv(t, tw, tb, stride=kwargs["stride"], dilation=kwargs["dilation"], groups=kwargs["groups"])


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("window, stride, padding", [(3, 2, 1), (2, 2, 0), ((3, 2), (2, 1), (1, 0)), (3, 1, 1)])
def test_pools_match_pytorch(window, stride, padding, ceil_mode, count_include_pad):
    x = np.round(np.random.default_rng(0).standard_normal((2, 3, 7, 6)) * 2) / 2  # ties included
    g_shape = ops.max_pool(x, window, stride, padding, ceil_mode=ceil_mode, layout="NCHW").shape
    g = np.random.default_rng(1).standard_normal(g_shape)
    for ours, theirs, extra in (
        (ops.max_pool, F.max_pool2d, {}),
        (ops.avg_pool, F.avg_pool2d, {"count_include_pad": count_include_pad}),
    ):
        y, vjp = jax.vjp(lambda x: ours(x, window, stride, padding, ceil_mode=ceil_mode, layout="NCHW", **extra), x)
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx, window, stride, padding, ceil_mode=ceil_mode, **extra)
        ty.backward(torch.from_numpy(g))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(vjp(g)[0], tx.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "stride, padding, output_padding, groups, dilation", [(2, 1, 1, 1, 1), (3, 0, 2, 2, 1), (2, 2, 1, 2, 2)]
)
def test_conv_transpose_matches_pytorch(stride, padding, output_padding, groups, dilation):
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(3 * groups)
    y = ops.conv_transpose(
        x,
        w,
        b,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
        layout="NCHW",
    )
    want = F.conv_transpose2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        torch.from_numpy(b),
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size, kernel, dilation", [(7, 4, 1), (8, 3, 2), (6, 2, 3)])
def test_same_padding_matches_pytorch(size, kernel, dilation):
    x, w = (
        np.random.default_rng(3).standard_normal((1, 2, size)),
        np.random.default_rng(4).standard_normal((3, 2, kernel)),
    )
    y = ops.conv(x, w, padding="same", dilation=dilation, layout="NCHW")
    want = F.conv1d(torch.from_numpy(x), torch.from_numpy(w), padding="same", dilation=dilation)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-10, atol=1e-12)
