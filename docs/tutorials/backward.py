# %% [markdown]
# # Deriving the backward of a convolution
#
# The lecture's example: a 3x3 input $x = h^{l-1}$, a 2x2 kernel $w$, stride 1, no padding, so a 2x2 output
# $h = h^l$:
#
# $$h_{ij} = \sum_{m=0}^{1} \sum_{n=0}^{1} x(i+m,\ j+n)\, w(m, n), \qquad i, j \in \{0, 1\}$$
#
# With a loss $E$ and its gradient $\delta_{ij} = \partial E / \partial h_{ij}$ from the layer above, the chain rule
# gives the gradient of a weight, the input cross-correlated with $\delta$:
#
# $$\frac{\partial E}{\partial w(m,n)} = \sum_{i,j} \delta_{ij} \frac{\partial h_{ij}}{\partial w(m,n)}
#   = \sum_{i=0}^{1} \sum_{j=0}^{1} \delta_{ij}\, x(i+m,\ j+n)$$
#
# and the gradient of an input pixel,
#
# $$\frac{\partial E}{\partial x(a,b)} = \sum_{i,j} \delta_{ij} \frac{\partial h_{ij}}{\partial x(a,b)},$$
#
# a sum over the outputs whose window covers it, those with $0 \le a - i \le 1$ and $0 \le b - j \le 1$:
#
# $$\frac{\partial E}{\partial x(a,b)}
#   = \sum_{i=\max(0,\,a-1)}^{\min(1,\,a)} \; \sum_{j=\max(0,\,b-1)}^{\min(1,\,b)} \delta_{ij}\, w(a-i,\ b-j)$$
#
# that is, $\delta$ zero-padded by 1 and cross-correlated with the kernel rotated by 180°, which is the same as the
# full convolution of $\delta$ with $w$:
#
# $$\frac{\partial E}{\partial x} = \operatorname{pad}_1(\delta) \star \operatorname{rot}_{180}(w)
#   = \delta * w \quad \text{(full)}$$
#
# where $\star$ is cross-correlation and $*$ convolution; "full" keeps every position where $\delta$ and $w$ overlap.
#
# **What this page checks**: each of the four `∂E/∂w` and nine `∂E/∂x` is written out below from the index sets
# of these sums (the expressions are generated, not typed), evaluated by NumPy from the same sums, and compared
# with the hand-derived backward of `ops.conv` (`backward="custom"` and `"textbook"`) and with JAX's autodiff
# (`backward="autodiff"`). Then stride, padding, dilation and groups, each with its changed formula checked the
# same way. Every comparison is an `assert`: a disagreement fails the site's build.

# %%
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from convlib import ops

jax.config.update("jax_enable_x64", True)  # float64: the formulas must agree to rounding, ~1e-15
MODES = ops.BACKWARDS  # ("custom", "textbook", "autodiff")


def nhwc(a):
    """A 2-D array as one image with one channel, (1, H, W, 1); a kernel as HWIO (kH, kW, 1, 1)."""
    return jnp.asarray(a)[None, :, :, None]


def hwio(a):
    return jnp.asarray(a)[:, :, None, None]


# %% [markdown]
# ## The forward, written out

# %%
K, H = 2, 3
OUT = H - K + 1
positions = list(itertools.product(range(OUT), range(OUT)))  # (i, j) of the output
offsets = list(itertools.product(range(K), range(K)))  # (m, n) of the kernel
pixels = list(itertools.product(range(H), range(H)))  # (a, b) of the input


def sym(name, *index):
    return f"{name}{''.join(map(str, index))}"


for i, j in positions:
    print(f"{sym('h', i, j)} = " + " + ".join(f"{sym('x', i + m, j + n)}·{sym('w', m, n)}" for m, n in offsets))

# %% [markdown]
# ## ∂E/∂w: the input cross-correlated with δ
#
# Each weight is used once per output, so its gradient collects one term per output:


# %%
def dw_terms(m, n):
    return [((i, j), (i + m, j + n)) for i, j in positions]  # (δ index, x index)


for m, n in offsets:
    print(f"∂E/∂{sym('w', m, n)} = " + " + ".join(f"{sym('δ', *d)}·{sym('x', *p)}" for d, p in dw_terms(m, n)))


# %% [markdown]
# ## ∂E/∂x: δ padded, cross-correlated with the rotated kernel
#
# An input pixel is read by every output whose window covers it: the corners by one, the edges by two, the centre
# by all four:


# %%
def dx_terms(a, b):
    return [((i, j), (a - i, b - j)) for i, j in positions if 0 <= a - i < K and 0 <= b - j < K]  # (δ, w)


for a, b in pixels:
    print(f"∂E/∂{sym('x', a, b)} = " + " + ".join(f"{sym('δ', *d)}·{sym('w', *k)}" for d, k in dx_terms(a, b)))

# %% [markdown]
# Read the centre row, $\partial E/\partial x_{11} = \delta_{00} w_{11} + \delta_{01} w_{10} + \delta_{10} w_{01} +
# \delta_{11} w_{00}$: δ meets the kernel *backwards*. Laid out as a grid, ∂E/∂x is δ padded with K − 1 = 1 zero on
# every side, cross-correlated with $\operatorname{rot}_{180}(w)$ (equivalently, δ fully convolved with $w$):

# %%
delta_padded = [["0"] * (OUT + 2)] + [["0", *[sym("δ", i, j) for j in range(OUT)], "0"] for i in range(OUT)]
delta_padded += [["0"] * (OUT + 2)]
rot = [[sym("w", K - 1 - m, K - 1 - n) for n in range(K)] for m in range(K)]
print("δ padded:", *(" ".join(f"{s:>3}" for s in row) for row in delta_padded), sep="\n  ")
print("rot180(w):", *(" ".join(row) for row in rot), sep="\n  ")
for a, b in pixels:  # the same terms, read off the grid: window (a, b) of the padded δ times rot180(w)
    grid = {(delta_padded[a + m][b + n], rot[m][n]) for m, n in offsets if delta_padded[a + m][b + n] != "0"}
    assert grid == {(sym("δ", *d), sym("w", *k)) for d, k in dx_terms(a, b)}
print("every ∂E/∂x read off the padded grid equals its sum above")

# %% [markdown]
# ## The numbers
#
# A concrete input, kernel and target `t`, with the loss `E = ½ Σ_ij (h_ij − t_ij)²`, so `δ = h − t`. NumPy
# evaluates the sums above term by term; `jax.grad` evaluates the same loss through `ops.conv` in each mode.

# %%
x = np.array([[1.0, 2.0, 0.0], [-1.0, 3.0, 1.0], [2.0, 0.0, -2.0]])
w = np.array([[0.5, -1.0], [2.0, 1.0]])
t = np.array([[1.0, 0.0], [0.0, 1.0]])

h = np.array([[sum(x[i + m, j + n] * w[m, n] for m, n in offsets) for j in range(OUT)] for i in range(OUT)])
delta = h - t
dw_formula = np.array([[sum(delta[d] * x[p] for d, p in dw_terms(m, n)) for n in range(K)] for m in range(K)])
dx_formula = np.array([[sum(delta[d] * w[k] for d, k in dx_terms(a, b)) for b in range(H)] for a in range(H)])
print("h =\n", h, "\nδ = h − t =\n", delta)
for m, n in offsets:
    terms = " + ".join(f"({delta[d]:g})·({x[p]:g})" for d, p in dw_terms(m, n))
    print(f"∂E/∂{sym('w', m, n)} = {terms} = {dw_formula[m, n]:g}")
for a, b in pixels:
    terms = " + ".join(f"({delta[d]:g})·({w[k]:g})" for d, k in dx_terms(a, b))
    print(f"∂E/∂{sym('x', a, b)} = {terms} = {dx_formula[a, b]:g}")


# %%
def loss(x, w, backward, **geometry):
    return 0.5 * jnp.sum((ops.conv(x, w, backward=backward, **geometry) - nhwc(t)) ** 2)


for mode in MODES:
    dx, dw = jax.grad(loss, argnums=(0, 1))(nhwc(x), hwio(w), mode)
    dx, dw = np.asarray(dx)[0, :, :, 0], np.asarray(dw)[:, :, 0, 0]
    print(f"{mode:9s} max |∂E/∂w − formula| = {np.max(np.abs(dw - dw_formula)):.1e},"
          f"  max |∂E/∂x − formula| = {np.max(np.abs(dx - dx_formula)):.1e}")  # fmt: skip
    assert np.allclose(dw, dw_formula, rtol=0, atol=1e-12) and np.allclose(dx, dx_formula, rtol=0, atol=1e-12)
print("∂E/∂w =\n", dw_formula, "\n∂E/∂x =\n", dx_formula)


# %% [markdown]
# ## The general formulas, one change at a time
#
# With stride $s$, dilation $d$, padding $(lo, hi)$, the dilated kernel extent $K_\text{eff} = d(K-1) + 1$ and
# $G = \partial E / \partial h$ (one spatial dim shown; the same per dim), the forward and the weight gradient are
#
# $$h_i = \sum_m x_\text{pad}(s\,i + d\,m)\; w(m), \qquad
#   \frac{\partial E}{\partial w(m)} = \sum_i G_i\; x_\text{pad}(s\,i + d\,m)$$
#
# ($x_\text{pad}$ cross-correlated with $G$ dilated by $s$, window step $d$). The input gradient is a full
# cross-correlation of $G$, dilated by $s$ and zero-padded, with the rotated kernel, dilated by $d$:
#
# $$G' = \operatorname{pad}\big(\operatorname{dilate}(G, s),\; K_\text{eff} - 1 - lo,\;
#   H + lo - (s\,(H_\text{out} - 1) + 1)\big),$$
#
# $$\frac{\partial E}{\partial x} = G' \star \operatorname{dilate}\big(\operatorname{rot}_{180}(w),\, d\big).$$
#
# - **Stride** `s`: output `i` reads input `s·i + m`, so the gradient lands on every s-th input position: `G` is
#   **dilated** (s − 1 zeros between its entries) before the full correlation.
# - **Padding** `lo`: the forward read `x_pad`, whose first `lo` rows are not inputs; the backward pads `G` by
#   `lo` **less**, which crops the gradient of the padding away. The high pad also absorbs rows the stride never
#   reached (exactly zero gradient).
# - **Dilation** `d`: the kernel taps are `d` apart, so the **rotated kernel is dilated** by `d` in ∂E/∂x, and
#   ∂E/∂w reads `x_pad` with a window step of `d`.
# - **Groups**: the kernel is block-diagonal over channel groups, so every gradient is the dense formula per group.
#
# NumPy versions of these formulas, straight from the lines above (2-D, one channel):


# %%
def dilate(a, s):
    """s − 1 zeros between neighbouring entries, along both axes."""
    out = np.zeros(((a.shape[0] - 1) * s + 1, (a.shape[1] - 1) * s + 1))
    out[::s, ::s] = a
    return out


def pad(a, lo, hi):
    """Zero padding by (lo, hi) on both axes; a negative amount crops."""
    a = np.pad(a, [(max(lo, 0), max(hi, 0))] * 2)
    return a[max(-lo, 0) : a.shape[0] - max(-hi, 0), max(-lo, 0) : a.shape[1] - max(-hi, 0)]


def correlate(a, k, step=1, k_dilation=1):
    """Valid cross-correlation: out(i, j) = Σ_mn a(step·i + k_dilation·m, step·j + k_dilation·n) k(m, n)."""
    extent = k_dilation * (k.shape[0] - 1) + 1
    size = (a.shape[0] - extent) // step + 1
    out = np.zeros((size, size))
    for i, j in itertools.product(range(size), repeat=2):
        for m, n in itertools.product(range(k.shape[0]), repeat=2):
            out[i, j] += a[step * i + k_dilation * m, step * j + k_dilation * n] * k[m, n]
    return out


def formula_gradients(x, w, g, *, stride=1, padding=0, dilation=1):
    s, d, lo, k = stride, dilation, padding, w.shape[0]
    k_eff, h_in, h_out = d * (k - 1) + 1, x.shape[0], g.shape[0]
    x_pad = pad(x, lo, lo)
    dw = correlate(x_pad, g, step=d, k_dilation=s)[:k, :k]  # G as the kernel, its taps s apart
    g_full = pad(dilate(g, s), k_eff - 1 - lo, h_in + lo - (s * (h_out - 1) + 1))
    dx = correlate(g_full, w[::-1, ::-1], k_dilation=d)
    return dx, dw


def check(name, x, w, **geometry):
    """The formulas against ops.conv's three backward modes, for a random upstream gradient G."""
    y = ops.conv(nhwc(x), hwio(w), **geometry)
    g = np.random.default_rng(1).normal(size=y.shape[1:3])
    dx_formula, dw_formula = formula_gradients(x, w, g, **geometry)
    worst = 0.0
    for mode in MODES:
        _, vjp = jax.vjp(lambda x, w: ops.conv(x, w, backward=mode, **geometry), nhwc(x), hwio(w))
        dx, dw = vjp(nhwc(g))
        errors = np.max(np.abs(dx[0, :, :, 0] - dx_formula)), np.max(np.abs(dw[:, :, 0, 0] - dw_formula))
        worst = max(worst, *errors)
    print(f"{name:32s} x {x.shape}, w {w.shape}, G {g.shape}: formula vs {'/'.join(MODES)} within {worst:.1e}")
    assert worst < 1e-12
    return dx_formula


rng = np.random.default_rng(0)
x7, w3 = rng.normal(size=(7, 7)), rng.normal(size=(3, 3))
CASES = {
    "lecture example": (x, w, {}),
    "stride 2": (x7, w3, {"stride": 2}),
    "stride 3, ragged (7 = 3·2 + 1)": (x7, w3, {"stride": 3}),
    "padding 1": (x7, w3, {"padding": 1}),
    "padding 2, stride 2": (x7, w3, {"padding": 2, "stride": 2}),
    "dilation 2": (x7, w3, {"dilation": 2}),
    "dilation 2, stride 2, padding 2": (x7, w3, {"dilation": 2, "stride": 2, "padding": 2}),
}
for name, (case_x, case_w, geometry) in CASES.items():
    check(name, case_x, case_w, **geometry)

# %% [markdown]
# The dilated, padded G of the stride-2 case, for a 7x7 input and a 3x3 kernel (entries 1 … 9 to tell them
# apart): zeros between the entries for the stride, $K_\text{eff} - 1 - lo = 2$ on the low side and
# $H + lo - (s\,(H_\text{out} - 1) + 1) = 7 - 5 = 2$ on the high side, so that a valid 3x3 correlation gives back
# 7x7:

# %%
g_example = np.arange(1.0, 10.0).reshape(3, 3)
g_full = pad(dilate(g_example, 2), 2, 2)
print(g_full.astype(int))
assert g_full.shape == (9, 9) and correlate(g_full, w3[::-1, ::-1]).shape == (7, 7)

# %% [markdown]
# What the stride does to ∂E/∂x, visibly: with stride 3 on 7 inputs, `3·(H_out − 1) + K = 3·1 + 3 = 6`, so the
# last input row and column are read by no output and get exactly zero gradient:

# %%
dx_ragged = check("stride 3 (printed)", x7, w3, stride=3)
print(np.round(dx_ragged, 2))
assert np.all(dx_ragged[-1, :] == 0) and np.all(dx_ragged[:, -1] == 0)

# %% [markdown]
# ## Groups: the dense formula per group
#
# With `groups=2`, input channels 0–1 meet output channels 0–1 only, and 2–3 meet 2–3: the gradient of a grouped
# conv is the concatenation of the dense gradients of each group's channel slices.

# %%
xg = jnp.asarray(rng.normal(size=(2, 6, 6, 4)))
wg = jnp.asarray(rng.normal(size=(3, 3, 2, 4)))  # HWIO: C_in / groups = 2, C_out = 4
gg = jnp.asarray(rng.normal(size=(2, 4, 4, 4)))
for mode in MODES:
    _, vjp = jax.vjp(lambda x, w: ops.conv(x, w, groups=2, backward=mode), xg, wg)
    dx, dw = vjp(gg)
    parts = []
    for group in range(2):
        channels = slice(2 * group, 2 * group + 2)
        _, dense_vjp = jax.vjp(lambda x, w: ops.conv(x, w, backward="textbook"), xg[..., channels], wg[..., channels])
        parts.append(dense_vjp(gg[..., channels]))
    assert np.allclose(dx, jnp.concatenate([p[0] for p in parts], axis=-1), atol=1e-12)
    assert np.allclose(dw, jnp.concatenate([p[1] for p in parts], axis=-1), atol=1e-12)
    print(f"groups=2, backward={mode!r}: ∂E/∂x and ∂E/∂w equal the two dense groups' gradients side by side")

# %% [markdown]
# ## What custom adds to textbook
#
# `backward="textbook"` always issues the formulas above as `lax` convolutions. `backward="custom"` computes the
# same sums in an order planned from the shapes (phases for strided ∂E/∂x, per-tap products for depthwise
# convolutions, batch chunks for ∂E/∂w; see [Add a backward formulation](../guides/new-formulation.html)). Both
# agree with autodiff to rounding, as checked on every case above.
