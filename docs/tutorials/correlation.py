# %% [markdown]
# # Cross-correlation and convolution
#
# What a convolutional layer computes, in the lecture's notation with indices from 0: an input $I$ of size
# $H \times W$, a kernel $W$ of size $k \times k$, and the output, for $i = 0, \dots, H-k$ and $j = 0, \dots, W-k$,
#
# $$h_{ij} = \sum_{m=0}^{k-1} \sum_{n=0}^{k-1} I(i+m,\ j+n)\, W(m, n).$$
#
# This is **cross-correlation**: the kernel slides over the input as it is. A true **convolution** flips the kernel
# first,
#
# $$(I * W)_{ij} = \sum_{m=0}^{k-1} \sum_{n=0}^{k-1} I(i+m,\ j+n)\, W(k-1-m,\ k-1-n),$$
#
# so convolving with $W$ is cross-correlating with $\operatorname{rot}_{180}(W)$. CNN layers (PyTorch's `conv2d`,
# `lax.conv`, and `convlib.ops.conv`) compute cross-correlation; `convlib.ops.convolve` is the convolution.
#
# **What this page checks** (every `assert` below runs when the site is built; a failing one fails the build):
#
# 1. `ops.conv` equals the equation above, written as a Python double sum;
# 2. `ops.convolve` equals `ops.conv` with the kernel rotated by 180°, and differs from it when the kernel is not
#    symmetric;
# 3. the lecture's three implementations (`convlib.ops.reference`: loops, im2col serialisation, `lax`) agree, and
#    how long each takes.

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np

from convlib import ops

rng = np.random.default_rng(0)

# %% [markdown]
# ## The equation, by hand
#
# A 5x5 input and a 3x3 kernel. `ops.conv` takes batches with channels: NHWC, so the image is `(1, 5, 5, 1)` and
# the kernel HWIO `(3, 3, 1, 1)`.

# %%
I = rng.integers(0, 5, (5, 5)).astype(np.float64)
W = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # a Sobel filter: not symmetric
k = W.shape[0]

h = np.zeros((I.shape[0] - k + 1, I.shape[1] - k + 1))
for i in range(h.shape[0]):
    for j in range(h.shape[1]):
        h[i, j] = sum(I[m + i, n + j] * W[m, n] for m in range(k) for n in range(k))

y = ops.conv(I[None, :, :, None], W[:, :, None, None])[0, :, :, 0]
print("I =\n", I, "\nh (the double sum) =\n", h, "\nops.conv =\n", np.asarray(y))
assert np.allclose(y, h)

# %% [markdown]
# ## The flip
#
# Rotating the kernel by 180° (both spatial axes reversed) turns one into the other.

# %%
convolved = ops.convolve(I[None, :, :, None], W[:, :, None, None])[0, :, :, 0]
rotated = ops.conv(I[None, :, :, None], W[::-1, ::-1, None, None])[0, :, :, 0]
print("ops.convolve =\n", np.asarray(convolved))
assert np.allclose(convolved, rotated)
assert not np.allclose(convolved, y)  # the Sobel kernel is antisymmetric: the flip changes the sign
assert np.allclose(convolved, -y)
print("convolve == conv(rot180(W)): True;  convolve == -conv here, since rot180(W) = -W for this kernel")

# %% [markdown]
# For a kernel that is its own 180° rotation (a Gaussian blur, a box filter) the two coincide, which is why the
# distinction is easy to miss. A learned kernel is arbitrary: a network trained with one convention learns the
# flipped kernel of the other, so nothing is lost by skipping the flip.

# %% [markdown]
# ## Three implementations
#
# `convlib.ops.reference` has the lecture's three ways, all taking the arguments of `ops.conv`:
#
# - `conv_loops`: loops over output positions and kernel offsets (NumPy, float64), the test oracle;
# - `conv_im2col`: every receptive field unrolled into a row of one patch matrix, then one matrix product;
# - `conv_lax`: `jax.lax.conv_general_dilated`, what `ops.conv` runs.
#
# On a batch of 8 images 32x32 with 16 channels, a 3x3 'same' convolution to 32 channels, with a stride and
# groups so that the geometry is not trivial:

# %%
x = rng.normal(size=(8, 32, 32, 16)).astype(np.float32)
w = rng.normal(size=(3, 3, 8, 32)).astype(np.float32) / 12  # HWIO with C_in / groups = 8
b = rng.normal(size=32).astype(np.float32)
kwargs = dict(stride=2, padding="SAME", groups=2)

outputs = {name: np.asarray(ops.conv_by(name, x, w, b, **kwargs)) for name in ops.IMPLEMENTATIONS}
reference = outputs["loops"]  # float64
for name, out in outputs.items():
    error = np.max(np.abs(out - reference)) / np.max(np.abs(reference))
    print(f"{name:7s} shape {out.shape}  max relative difference from the loops {error:.1e}")
    assert out.shape == (8, 16, 16, 32) and error < 1e-5
assert np.allclose(outputs["lax"], ops.conv(x, w, b, **kwargs), atol=1e-6)


# %% [markdown]
# Their times, median of a few calls after a first one that compiles (the loops are plain NumPy and not
# compiled):


# %%
def median_ms(fn, repeats):
    fn()  # compiles (jit) or warms the caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


im2col = jax.jit(lambda x, w, b: ops.conv_im2col(x, w, b, **kwargs))
lax_conv = jax.jit(lambda x, w, b: ops.conv_lax(x, w, b, **kwargs))
xj, wj, bj = map(jnp.asarray, (x, w, b))
times = {
    "loops": median_ms(lambda: ops.conv_loops(x, w, b, **kwargs), 3),
    "im2col": median_ms(lambda: im2col(xj, wj, bj), 20),
    "lax": median_ms(lambda: lax_conv(xj, wj, bj), 20),
}
flops = 2 * 8 * 16 * 16 * 32 * 3 * 3 * 8  # 2 x multiply-adds: N x H_out x W_out x C_out x k x k x C_in/groups
for name, ms in times.items():
    print(f"{name:7s} {ms:9.2f} ms   {flops / ms / 1e6:7.2f} GFLOP/s")
assert times["lax"] < times["loops"]

# %% [markdown]
# The numbers are this build machine's. The loops pay Python for every output position and kernel offset
# (their inner step is one NumPy product over batch and channels); im2col materialises a patch matrix 9 times
# the input and is bound by memory; `lax` calls XLA's convolution. The experiment
# `experiments/implementations.py` sweeps sizes from 18 kFLOP to 2.4 GFLOP (see [Experiments](../experiments.html)).
