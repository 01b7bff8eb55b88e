# %% [markdown]
# # Pooling's backward
#
# Pooling has no weights, so its backward only routes $G = \partial E / \partial y$ back to the inputs. Max pooling
# sends each output's gradient to the first maximum of its window, $M(o)$:
#
# $$y_o = \max_{p \in \operatorname{window}(o)} x_p, \qquad
#   \frac{\partial E}{\partial x_p} = \sum_{o\,:\; M(o) = p} G_o;$$
#
# average pooling shares it among the window's pixels:
#
# $$y_o = \frac{1}{D_o} \sum_{p \in \operatorname{window}(o)} x_p, \qquad
#   \frac{\partial E}{\partial x_p} = \sum_{o\,:\; p \in \operatorname{window}(o)} \frac{G_o}{D_o},$$
#
# where "first" is in row-major order inside the window and $D_o$ is the divisor: the window size, or with
# `count_include_pad=False` only the real (unpadded) pixels it covers. Overlapping windows (stride < window)
# accumulate.
#
# **What this page checks**: the NumPy versions of these two lines against `ops.max_pool` / `ops.avg_pool` with
# `backward="custom"` (hand-derived) and `"autodiff"`; the tie rule; what happens with NaN. Each claim is an
# `assert`, run when the site is built.

# %%
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from convlib import ops

jax.config.update("jax_enable_x64", True)


def image(a):
    return jnp.asarray(a, jnp.float64)[None, :, :, None]  # NHWC, one image, one channel


def pool_gradient(pool, x, mode, **kwargs):
    """∂E/∂x for E = Σ_o y_o G_o with G = 1, 2, 3, ... (so that every window's share can be told apart)."""
    y, vjp = jax.vjp(lambda x: pool(x, backward=mode, **kwargs), image(x))
    g = jnp.arange(1.0, y.size + 1).reshape(y.shape)
    return np.asarray(vjp(g)[0])[0, :, :, 0], np.asarray(g)[0, :, :, 0]


# %% [markdown]
# ## Max: one winner per window
#
# A 4x4 input, 2x2 windows, stride 2. Window (0, 0) holds a tie, 3 and 3: the gradient goes to the first in
# row-major order, `x[0, 1]`, as in PyTorch and XLA.

# %%
x = np.array([[1.0, 3.0, 0.0, 1.0], [3.0, 2.0, 4.0, 1.0], [0.0, 1.0, 2.0, 5.0], [1.0, 6.0, 2.0, 2.0]])


def max_pool_gradient(x, g, window, stride):
    dx = np.zeros_like(x)
    for i, j in itertools.product(range(g.shape[0]), range(g.shape[1])):
        patch = x[stride * i : stride * i + window, stride * j : stride * j + window]
        m, n = np.unravel_index(np.argmax(patch), patch.shape)  # argmax: the first maximum, row-major
        dx[stride * i + m, stride * j + n] += g[i, j]
    return dx


for mode in ("custom", "autodiff"):
    dx, g = pool_gradient(ops.max_pool, x, mode, window=2)
    assert np.array_equal(dx, max_pool_gradient(x, g, 2, 2))
    print(f"backward={mode!r}: G =\n{g}\n∂E/∂x =\n{dx}")
assert dx[0, 1] == 1 and dx[1, 0] == 0  # the tie: first maximum

# %% [markdown]
# Overlapping windows (3x3, stride 1 on a 5x5 input): a pixel that is the maximum of several windows collects all
# their gradients.

# %%
rng = np.random.default_rng(0)
x5 = rng.integers(0, 4, (5, 5)).astype(float)  # small integers: many ties
for mode in ("custom", "autodiff"):
    dx, g = pool_gradient(ops.max_pool, x5, mode, window=3, stride=1)
    assert np.array_equal(dx, max_pool_gradient(x5, g, 3, 1))
print("x =\n", x5, "\n∂E/∂x (G = 1 … 9) =\n", dx)
assert dx.sum() == g.sum()  # every window sends its whole gradient to exactly one pixel

# %% [markdown]
# ## NaN
#
# A window holding NaN outputs NaN (PyTorch and XLA agree). convlib's backward keeps the one rule, first match in
# row-major order, and sends the gradient to the **first** NaN. JAX's autodiff (XLA's `select_and_scatter`) makes
# its own choice; what it does on this machine is printed, not asserted, since it is not a documented rule.

# %%
x_nan = np.array([[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 1.0, 1.0], [0.0, np.nan, 2.0, 2.0], [1.0, np.nan, 2.0, 2.0]])
y = ops.max_pool(image(x_nan), 2)[0, :, :, 0]
print("y =\n", np.asarray(y))
assert np.isnan(y[1, 0]) and not np.isnan(y[0, 0])
for mode in ("custom", "autodiff"):
    dx, g = pool_gradient(ops.max_pool, x_nan, mode, window=2)
    print(f"backward={mode!r}: ∂E/∂x =\n{dx}")
    if mode == "custom":
        assert dx[2, 1] == g[1, 0] and dx[3, 1] == 0  # the first NaN of window (1, 0) takes it all

# %% [markdown]
# ## Average: an even share
#
# Every pixel of a window gets `G_o / D_o`. With padding 1, a 3x3 window at the corner covers 4 real pixels:
# `count_include_pad=True` (the default, PyTorch's) still divides by 9, `False` by 4.


# %%
def avg_pool_gradient(x, g, window, stride, padding, count_include_pad):
    x_pad = np.pad(x, padding)
    real = np.pad(np.ones_like(x), padding)
    dx_pad = np.zeros_like(x_pad)
    for i, j in itertools.product(range(g.shape[0]), range(g.shape[1])):
        rows = slice(stride * i, stride * i + window)
        cols = slice(stride * j, stride * j + window)
        divisor = window * window if count_include_pad else real[rows, cols].sum()
        dx_pad[rows, cols] += g[i, j] / divisor
    return dx_pad[padding:-padding, padding:-padding] if padding else dx_pad


x6 = rng.normal(size=(6, 6))
for include in (True, False):
    for mode in ("custom", "autodiff"):
        dx, g = pool_gradient(ops.avg_pool, x6, mode, window=3, stride=2, padding=1, count_include_pad=include)
        expected = avg_pool_gradient(x6, g, 3, 2, 1, include)
        assert np.allclose(dx, expected, rtol=0, atol=1e-12), (include, mode)
    print(f"count_include_pad={include}: ∂E/∂x[0, 0] = G_00 / {1 / dx[0, 0]:g}  (custom and autodiff agree)")
    assert np.isclose(1 / dx[0, 0], 9 if include else 4)
