# %% [markdown]
# # Receptive fields
#
# How many input pixels does one unit of layer $l$ see? For a stack of layers with kernel extent
# $K_\text{eff} = d\,(K-1) + 1$ (dilation $d$) and stride $s$, measured in input pixels:
#
# $$\text{size}_l = \text{size}_{l-1} + (K_\text{eff} - 1)\, \text{jump}_{l-1}, \qquad
#   \text{jump}_l = \text{jump}_{l-1}\, s,$$
#
# starting from the input itself, $\text{size}_0 = \text{jump}_0 = 1$.
#
# `ops.receptive_fields` computes this from the layers' geometries. The lecture's questions: how does the field grow
# with (Q1) bigger kernels and stacking, and (Q2) pooling or stride and dilation?
#
# **What this page checks**: for each kind of stack, the calculator against the field **measured through
# gradients** (the nonzero region of ∂(centre output unit)/∂(input), through a linear stack with all-ones kernels,
# where nothing cancels); and the context module of Yu & Koltun (2016), whose dilations 1, 1, 2, 4, 8, 16, 1 give
# fields 3, 5, 9, 17, 33, 65, 67, read from `convlib.models`' own layers.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from convlib import models, nn, ops


def conv_layer(kernel, stride=1, dilation=1):
    return ("conv", ops.make_geometry(2, kernel, stride=stride, dilation=dilation))


def pool_layer(window):
    return ("pool", ops.make_geometry(2, window, stride=window))


def measured_field(layers, size=160):
    """(height, width) of the input region that the centre unit of the last layer depends on, from its gradient,
    and the gradient cropped to that region."""

    def forward(x):
        for kind, g in layers:
            if kind == "conv":  # all ones: every path has weight > 0, so no gradient entry cancels
                w = jnp.ones((*g.kernel, 1, 1))
                x = ops.conv(x, w, stride=g.stride, dilation=g.dilation)
            else:
                x = ops.avg_pool(x, g.kernel, g.stride)
        centre = tuple(n // 2 for n in x.shape[1:3])
        return x[0, centre[0], centre[1], 0]

    grad = jax.grad(forward)(jnp.ones((1, size, size, 1)))[0, :, :, 0]
    rows, cols = np.nonzero(np.asarray(grad))
    field = np.asarray(grad)[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return *field.shape, field


stacks = {
    "3x3 convs": lambda depth: [conv_layer(3)] * depth,
    "5x5 convs": lambda depth: [conv_layer(5)] * depth,
    "3x3 conv + 2x2 pool": lambda depth: [conv_layer(3), pool_layer(2)] * depth,
    "3x3 convs, stride 2": lambda depth: [conv_layer(3, stride=2)] * depth,
    "3x3 convs, dilation 2^(l-1)": lambda depth: [conv_layer(3, dilation=2**i) for i in range(depth)],
}
table = {}
for name, build in stacks.items():
    table[name] = []
    for depth in range(1, 6):
        layers = build(depth)
        computed = ops.receptive_field([g for _, g in layers]).size
        height, width, _ = measured_field(layers)
        assert computed == (height, width), (name, depth, computed, (height, width))
        table[name].append(computed[0])
    print(f"{name:28s} depth 1-5: {table[name]}   (computed = measured)")

# %% [markdown]
# - **Q1**: a stack of L layers of K x K grows the field linearly, `1 + (K − 1) L`; two 3x3 layers see what one
#   5x5 sees (5x5), with 18 weights per channel pair instead of 25 — VGG's argument.
# - **Q2**: a pool or a stride multiplies the jump, so every later layer adds `(K − 1) · jump`: growth becomes
#   exponential (`2^(L+1) − 1` for stride 2), at the price of resolution. Dilation doubling per layer grows the
#   field exponentially too, **without** losing resolution — the idea of the context module.

# %%
assert table["3x3 convs"] == [1 + 2 * L for L in range(1, 6)]
assert table["5x5 convs"] == [1 + 4 * L for L in range(1, 6)]
assert table["3x3 convs, stride 2"] == [2 ** (L + 1) - 1 for L in range(1, 6)]
assert table["3x3 conv + 2x2 pool"] == [4, 10, 22, 46, 94]
assert table["3x3 convs, dilation 2^(l-1)"] == [2 ** (L + 1) - 1 for L in range(1, 6)]

# %% [markdown]
# ## The context module
#
# `models.create("context_basic", ...)` holds seven 3x3 convs with dilations 1, 1, 2, 4, 8, 16, 1 and a final 1x1.
# Its geometries, read from the module's own `nn.Conv` layers, give the field after each layer:

# %%
context = models.create("context_basic", num_classes=4, rngs=nnx.Rngs(0))
convs = [layer for _, layer in nnx.iter_graph(context) if isinstance(layer, nn.Conv)]
geometries = [
    ops.make_geometry(2, c.kernel_size, stride=c.stride, padding=c.padding, dilation=c.dilation) for c in convs
]
fields = [f.size[0] for f in ops.receptive_fields(geometries)]
print("dilations:", [g.dilation[0] for g in geometries])
print("receptive fields:", fields)
assert fields == [3, 5, 9, 17, 33, 65, 67, 67]

# %% [markdown]
# The same field measured through the gradient of the centre unit of layer 6 (field 65) and of a stack with the
# same number of layers but dilation 2 everywhere. With dilation 2 from the first layer, every unit reads only
# pixels at even offsets from its centre: the "gridding" holes the lecture warns about. Starting with dilation 1,
# the context module covers its whole field.

# %%
dilated = [conv_layer(3, dilation=d) for d in (1, 1, 2, 4, 8, 16)]
gridded = [conv_layer(3, dilation=2)] * 6
h_dilated, _, grad_dilated = measured_field(dilated, size=99)
h_grid, _, grad_grid = measured_field(gridded, size=99)
covered_dilated, covered_grid = np.mean(grad_dilated > 0), np.mean(grad_grid > 0)
print(f"context module, layer 6: field {h_dilated}, {covered_dilated:.0%} of its pixels reached")
print(f"dilation 2 x 6:          field {h_grid}, {covered_grid:.0%} of its pixels reached")
assert h_dilated == 65 and covered_dilated == 1.0
assert h_grid == 25 and covered_grid < 0.3

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
for (name, sizes), style in zip(table.items(), ("o-", "s-", "^-", "D-", "x--")):
    axes[0].plot(range(1, 6), sizes, style, label=name)  # stride 2 and doubling dilations coincide: dashed
axes[0].set(xlabel="depth (layers, or conv+pool blocks)", ylabel="receptive field (input pixels, one side)")
axes[0].set_yscale("log", base=2)
axes[0].set_title("computed = measured through gradients")
axes[0].legend(fontsize=8)
for ax, grad, title in (
    (axes[1], grad_dilated, "dilations 1, 1, 2, 4, 8, 16"),
    (axes[2], grad_grid, "dilation 2 x 6 (gridding)"),
):
    r = grad.shape[0] / 2  # pixel edges, centre at 0
    shown = ax.imshow(np.log10(np.where(grad > 0, grad, np.nan)), cmap="viridis", extent=(-r, r, r, -r))
    ax.set(title=title, xlabel="input column − centre (pixels)", ylabel="input row − centre (pixels)")
    fig.colorbar(shown, ax=ax, label="log10 ∂(centre unit)/∂(input pixel)")
# alt: Left, receptive field against depth on a log scale for the five kinds of stack, computed and measured alike;
#   middle, the context module's dilations 1, 1, 2, 4, 8, 16 reach every pixel of a 65-pixel square; right, six
#   layers of dilation 2 reach only a sparse grid of pixels.
plt.show()

# %% [markdown]
# Left: the field grows linearly with depth for plain stacks and exponentially with a stride, a pool or doubling
# dilations (log scale). Middle and right: the gradient of one unit over its field (white: zero); the context
# module reaches every pixel of its 65x65 field, dilation 2 throughout only a quarter of its 25x25 one. The
# experiment `experiments/receptive_field.py` checks 42 stacks and the effective receptive field of a trained
# ResNet (see [Experiments](../experiments.html)).
