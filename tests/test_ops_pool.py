"""convlib.ops.max_pool / avg_pool: hand-derived backward vs autodiff vs NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convlib import ops

pytestmark = pytest.mark.usefixtures("x64")
RTOL, ATOL = 1e-12, 1e-12  # float64; a window holds at most 27 values


def pool_loops(x, window, stride, pads, kind, count_include_pad=True, explicit=None):
    """Channels-last pooling by explicit loops. `pads`: (lo, hi) per dim incl. any ceil overhang;
    `explicit`: the user's padding (what count_include_pad counts)."""
    explicit = pads if explicit is None else explicit
    fill = -np.inf if kind == "max" else 0.0
    counted = np.pad(np.ones(x.shape[1:-1]), explicit, constant_values=1.0 if count_include_pad else 0.0)
    counted = np.pad(counted, [(0, hi - e) for (_, hi), (_, e) in zip(pads, explicit)])
    x_pad = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)], constant_values=fill)
    out = [(n - k) // s + 1 for n, k, s in zip(x_pad.shape[1:-1], window, stride)]
    y = np.zeros((x.shape[0], *out, x.shape[-1]))
    for index in np.ndindex(*out):
        sl = tuple(slice(i * s, i * s + k) for i, s, k in zip(index, stride, window))
        patch = x_pad[(slice(None),) + sl + (slice(None),)]
        patch = patch.reshape(x.shape[0], int(np.prod(window)), x.shape[-1])
        if kind == "max":
            y[(slice(None),) + index] = patch.max(axis=1)
        else:
            y[(slice(None),) + index] = patch.sum(axis=1) / counted[sl].sum()
    return y


@st.composite
def pool_configs(draw):
    ndim = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    pads = tuple((draw(st.integers(0, k // 2)), draw(st.integers(0, k // 2))) for k in window)
    spatial = tuple(draw(st.integers(k, k + (3 if ndim < 3 else 1))) for k in window)
    # 9 channels: a minor axis long enough for the tiled max-pool backward's offset-by-offset path
    return (draw(st.integers(0, 2)), *spatial, draw(st.sampled_from([1, 2, 9]))), window, stride, pads


@settings(max_examples=15)
@given(pool_configs(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_pools_match_loops_and_autodiff(config, ceil_mode, count_include_pad, seed):
    shape, window, stride, pads = config
    x = np.random.default_rng(seed).standard_normal(shape)
    # Quantise so windows hold ties: the tie rule must agree with XLA's too.
    x = np.round(x * 2) / 2
    for kind, pool in (("max", ops.max_pool), ("avg", ops.avg_pool)):
        extra = {} if kind == "max" else {"count_include_pad": count_include_pad}
        f = lambda x, b: pool(x, window, stride, pads, ceil_mode=ceil_mode, backward=b, **extra)
        y = f(x, "custom")
        g = np.random.default_rng(seed + 1).standard_normal(y.shape)
        # ceil mode: the high padding grows until the last output's window fits
        ceil_pads = tuple(
            (lo, max(hi, (y.shape[1 + d] - 1) * stride[d] + window[d] - shape[1 + d] - lo))
            for d, (lo, hi) in enumerate(pads)
        )
        want = pool_loops(x, window, stride, ceil_pads, kind, count_include_pad, explicit=pads)
        np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL)
        (dx_custom,) = jax.vjp(lambda x: f(x, "custom"), x)[1](g)
        (dx_auto,) = jax.vjp(lambda x: f(x, "autodiff"), x)[1](g)
        np.testing.assert_allclose(dx_custom, dx_auto, rtol=RTOL, atol=ATOL)


@settings(max_examples=20)
@given(pool_configs(), st.booleans(), st.sampled_from(["NHWC", "NCHW"]), st.booleans(), st.integers(0, 2**16))
def test_tiling_max_pool_gradient(config, ceil_mode, layout, with_nan, seed):
    """Windows that tile the input (stride = window; their gradient is cut out and put back by reshapes) route
    every cotangent as the overlapping path does: ties to the first maximum, NaN windows to the first NaN,
    padding, ceil-mode overhang and the rows no window reads get nothing; in both layouts, 1-3-D."""
    shape, window, _, pads = config
    x = np.round(np.random.default_rng(seed).standard_normal(shape) * 2) / 2
    if with_nan and x.size:
        x.reshape(-1)[np.random.default_rng(seed + 2).integers(x.size)] = np.nan
    if layout == "NCHW":
        x = np.moveaxis(x, -1, 1)
    tiling = lambda x, b: ops.max_pool(x, window, window, pads, ceil_mode=ceil_mode, layout=layout, backward=b)
    y, vjp = jax.vjp(lambda x: tiling(x, "custom"), x)
    g = np.random.default_rng(seed + 1).standard_normal(y.shape)
    (dx,) = vjp(g)
    # Brute force: each window's first maximum (or first NaN), row-major, takes the window's cotangent.
    want = np.zeros_like(x)
    x_last = np.moveaxis(x, 1, -1) if layout == "NCHW" else x
    g_last = np.moveaxis(g, 1, -1) if layout == "NCHW" else g
    want_last = np.moveaxis(want, 1, -1) if layout == "NCHW" else want
    ceil_pads = [
        (lo, max(hi, (g_last.shape[1 + d] - 1) * window[d] + window[d] - x_last.shape[1 + d] - lo))
        for d, (lo, hi) in enumerate(pads)
    ]
    padded = np.pad(x_last, [(0, 0), *ceil_pads, (0, 0)], constant_values=-np.inf)
    for n, *index, c in np.ndindex(*g_last.shape):
        start = [i * k for i, k in zip(index, window)]
        patch = padded[(n, *(slice(s, s + k) for s, k in zip(start, window)), c)].reshape(-1)
        first = int(np.argmax(np.isnan(patch))) if np.isnan(patch).any() else int(np.argmax(patch))
        offset = np.unravel_index(first, window)
        position = tuple(s + o - lo for s, o, (lo, _) in zip(start, offset, ceil_pads))
        if all(0 <= p < h for p, h in zip(position, x_last.shape[1:-1])):
            want_last[(n, *position, c)] += g_last[(n, *index, c)]
    np.testing.assert_array_equal(dx, want)
    if not with_nan:
        np.testing.assert_array_equal(dx, jax.vjp(lambda x: tiling(x, "autodiff"), x)[1](g)[0])


def test_max_pool_tie_goes_to_first_maximum_in_row_major_order():
    x = np.array([[3.0, 1.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
    dx = jax.grad(lambda x: jnp.sum(ops.max_pool(x, 2)))(x)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 0], [0, 0]])
    x = np.array([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
    dx = jax.grad(lambda x: jnp.sum(ops.max_pool(x, 2)))(x)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0, 1], [0, 0]])


def test_overlapping_windows_accumulate():
    x = np.array([0.0, 5.0, 1.0, 0.0, 2.0]).reshape(1, 5, 1)  # windows [0:3], [2:5] ... stride 1
    dx = jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, stride=1)))(x)
    np.testing.assert_array_equal(dx[0, :, 0], [0, 2, 0, 0, 1])
    dx = jax.grad(lambda x: jnp.sum(ops.avg_pool(x, 3, stride=1)))(x)
    np.testing.assert_allclose(dx[0, :, 0], np.array([1, 2, 3, 2, 1]) / 3)


def test_max_pool_nan_propagates_and_takes_the_gradient():
    x = np.array([1.0, np.nan, 3.0, 2.0]).reshape(1, 4, 1)
    y = ops.max_pool(x, 2)
    assert np.isnan(y[0, 0, 0]) and y[0, 1, 0] == 3.0
    y, vjp = jax.vjp(lambda x: ops.max_pool(x, 2), x)
    np.testing.assert_array_equal(vjp(np.ones_like(y))[0][0, :, 0], [0, 1, 1, 0])


@pytest.mark.parametrize("count_include_pad, want", [(True, [2 / 3, 1, 2 / 3]), (False, [1, 1, 1])])
def test_avg_pool_count_include_pad(count_include_pad, want):
    # windows over padded positions: (pad, x0, x1), (x1, x2, x3), (x3, x4, pad)
    y = ops.avg_pool(np.ones((1, 5, 1)), 3, 2, 1, count_include_pad=count_include_pad)
    np.testing.assert_allclose(y[0, :, 0], want)


def test_avg_pool_ceil_overhang_is_never_counted():
    # ceil mode adds a 4th window (x5, pad, overhang): PyTorch divides by 2 with count_include_pad
    x = np.arange(6.0).reshape(1, 6, 1)
    y = ops.avg_pool(x, 3, 2, 1, ceil_mode=True, count_include_pad=True)
    np.testing.assert_allclose(y[0, :, 0], [1 / 3, 2, 4, 5 / 2])


def test_ceil_mode_output_size_follows_pytorch():
    x = np.zeros((1, 6, 6, 1))
    assert ops.max_pool(x, 3, 2).shape == (1, 2, 2, 1)
    assert ops.max_pool(x, 3, 2, ceil_mode=True).shape == (1, 3, 3, 1)
    # the last window would start in the right padding only: dropped
    assert ops.max_pool(np.zeros((1, 5, 1)), 2, 2, 1, ceil_mode=True).shape == (1, 3, 1)


def test_nchw_layout_matches_nhwc():
    x = np.random.default_rng(0).standard_normal((2, 7, 6, 3))
    for pool in (ops.max_pool, ops.avg_pool):
        y = pool(x, (3, 2), (2, 1), 1)
        y_nchw = pool(np.moveaxis(x, -1, 1), (3, 2), (2, 1), 1, layout="NCHW")
        np.testing.assert_allclose(np.moveaxis(y_nchw, 1, -1), y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_pools_keep_dtype(dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 2)), dtype)
    for pool in (ops.max_pool, ops.avg_pool):
        y, vjp = jax.vjp(lambda x: pool(x, 2), x)
        assert y.dtype == dtype and vjp(jnp.ones_like(y))[0].dtype == dtype


def test_every_window_offset_is_visited_once():
    """Avg-pool's backward with window == stride tiles the input: each input gets exactly G / K."""
    x = np.zeros((1, 6, 6, 1))
    dx = jax.grad(lambda x: jnp.sum(ops.avg_pool(x, (2, 3))))(x)
    np.testing.assert_allclose(dx, 1 / 6)
