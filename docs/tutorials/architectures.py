# %% [markdown]
# # Architectures: LeNet-5, AlexNet, VGG, ResNet
#
# Four ideas from four papers, each read from the convlib model that implements it:
#
# - **LeNet-5** (LeCun et al. 1998): C3's sparse connection table;
# - **AlexNet** (Krizhevsky et al. 2012): filter groups, the two-GPU split;
# - **VGG** (Simonyan & Zisserman 2015): stacks of 3x3 convolutions instead of large kernels;
# - **ResNet** (He et al. 2016): the shortcut `y = ReLU(F(x) + x)`.
#
# Parameters are counted by `models.param_count` (trainable `nnx.Param` entries), FLOPs by `models.flops`
# (2 x the multiply-adds of convolutions and dense layers, read from the traced program with abstract shapes, so
# nothing is allocated). **What this page checks**: each count below against its formula or the paper's number,
# and one forward pass of every model (concrete for the small ones, `jax.eval_shape` for the ImageNet ones).

# %%
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convlib import models, ops

# XLA:CPU compiles the default (threefry) random-bit generator slowly, about a second per parameter shape on this
# build's 2 cores; "rbg" compiles in a tenth of that. These pages need no particular random stream.
jax.config.update("jax_default_prng_impl", "rbg")
rngs = nnx.Rngs(params=0, dropout=1)


def abstract_forward(model, input_shape):
    """The output shape of a forward pass of an abstract model: jax.eval_shape, no arrays allocated."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x).shape


# %% [markdown]
# ## LeNet-5: C3's connection table
#
# C3 has 16 maps of 5x5 kernels over S2's 6 maps, but not every C3 map reads every S2 map (Table I of the paper):
# 6 read 3 consecutive maps, 6 read 4 consecutive, 3 read 4 non-consecutive, 1 reads all six. The paper's reasons:
# fewer connections, and broken symmetry, so that different maps are forced to learn different features.

# %%
print("S2 map \\ C3 map " + " ".join(f"{j:2d}" for j in range(16)))
for i in range(6):
    print(f"{i:>15d} " + " ".join(" X" if i in row else " ." for row in models.C3_TABLE))
connections = sum(len(row) for row in models.C3_TABLE)
c3_formula = 5 * 5 * connections + 16  # a 5x5 kernel per connection, one bias per map
lenet = models.create("lenet5", in_channels=1, rngs=rngs)  # concrete: it runs a forward below
c3_counted = models.param_count(lenet.c3)
print(f"{connections} connections: 25 x {connections} + 16 = {c3_formula} parameters; counted: {c3_counted}")
print(f"a dense C3 would have 25 x 6 x 16 + 16 = {25 * 6 * 16 + 16}")
assert connections == 60 and c3_counted == c3_formula == 1516

lenet_rbf = models.abstract_model("lenet5", in_channels=1, head="rbf")
print(f"LeNet-5: {models.param_count(lenet):,} parameters (softmax head), "
      f"{models.param_count(lenet_rbf):,} with the paper's RBF head; "
      f"{models.flops(lenet, (32, 32, 1)):,} FLOPs per 32x32 image")  # fmt: skip
assert models.param_count(lenet_rbf) == 60_000  # the paper's count
y = lenet(jnp.zeros((2, 32, 32, 1)))
print("forward: (2, 32, 32, 1) ->", y.shape)
assert y.shape == (2, 10)

# %% [markdown]
# ## AlexNet: filter groups
#
# conv2, conv4 and conv5 have `groups=2`: each half of the output maps reads only its half of the input maps
# (the paper's two GPUs). A grouped kernel is `(kH, kW, C_in / groups, C_out)`, so it has 1/groups of the weights
# and the FLOPs of a dense one.

# %%
alexnet = models.abstract_model("alexnet", num_classes=1000)
conv2 = alexnet.conv2
dense = 5 * 5 * 96 * 256 + 256
print(f"conv2 kernel {conv2.kernel.shape} (groups={conv2.groups}): {models.param_count(conv2):,} parameters; "
      f"dense: {dense:,}")  # fmt: skip
assert conv2.kernel.shape == (5, 5, 48, 256) and models.param_count(conv2) == 5 * 5 * 48 * 256 + 256
alexnet_params, alexnet_flops = models.param_count(alexnet), models.flops(alexnet, (224, 224, 3))
print(f"AlexNet: {alexnet_params:,} parameters, {alexnet_flops / 1e9:.2f} GFLOPs per 224x224 image")
assert alexnet_params == 60_965_224
print("forward (abstract): (1, 224, 224, 3) ->", abstract_forward(alexnet, (224, 224, 3)))

# %% [markdown]
# The same split in the smallest form: a grouped convolution equals two dense convolutions on the channel halves,
# side by side.

# %%
x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
grouped = ops.conv(x, w, groups=2)
halves = jnp.concatenate([ops.conv(x[..., :2], w[..., :3]), ops.conv(x[..., 2:], w[..., 3:])], axis=-1)
assert np.allclose(grouped, halves, atol=1e-5)
print("conv(groups=2) == [conv(first half), conv(second half)]")

# %% [markdown]
# ## VGG: stacks of 3x3
#
# Two 3x3 layers see 5x5, three see 7x7 (see [Receptive fields](receptive_fields.html)), with fewer weights and
# more non-linearities: for C channels in and out, three 3x3 layers have 27 C² weights, one 7x7 has 49 C².

# %%
c = 512
for layers, big in ((2, 5), (3, 7)):
    field = ops.receptive_field([ops.make_geometry(2, 3)] * layers).size[0]
    stack, single = layers * 9 * c * c, big * big * c * c
    print(f"{layers} x 3x3: field {field}, {stack:,} weights;  one {big}x{big}: {single:,} weights "
          f"({single / stack:.2f}x)")  # fmt: skip
    assert field == big
vgg_rows = {}
for name in ("vgg11", "vgg16", "vgg19"):
    model = models.abstract_model(name, num_classes=1000)
    vgg_rows[name] = models.param_count(model), models.flops(model, (224, 224, 3))
    print(f"{name}: {vgg_rows[name][0]:,} parameters, {vgg_rows[name][1] / 1e9:.1f} GFLOPs; forward (abstract):",
          abstract_forward(model, (224, 224, 3)))  # fmt: skip
assert vgg_rows["vgg16"][0] == 138_357_544
assert abs(vgg_rows["vgg19"][1] / 2 / 19.6e9 - 1) < 0.02  # the paper's 19.6 G multiply-adds
print("vgg11_small forward (abstract):", abstract_forward(models.abstract_model("vgg11_small"), (32, 32, 3)))

# %% [markdown]
# ## ResNet: the shortcut
#
# A residual block computes `ReLU(F(x) + x)`: the layers learn a correction to the identity. convlib's CIFAR nets
# use option A shortcuts (subsample and zero-pad the channels where the shape changes), which have no parameters,
# so `plainN` — the same net without shortcuts — has exactly `resnetN`'s parameters. Where the channels stay, the
# shortcut is the identity.

# %%
resnet = models.create("resnet20", num_classes=10, rngs=rngs)
plain = models.abstract_model("plain20", num_classes=10)
print(f"resnet20: {models.param_count(resnet):,} parameters, plain20: {models.param_count(plain):,}; "
      f"{models.flops(resnet, (32, 32, 3)) / 1e6:.1f} MFLOPs per 32x32 image")  # fmt: skip
assert models.param_count(resnet) == models.param_count(plain) == 269_722

blocks = [m for _, m in nnx.iter_graph(resnet) if type(m).__name__ == "BasicBlock"]  # stage 1 first
block = blocks[0]
block.eval()
x = jax.random.normal(jax.random.key(2), (1, 32, 32, 16))
residual = block.norm2(block.conv2(jax.nn.relu(block.norm1(block.conv1(x)))))
assert block.shortcut is None  # the identity
assert np.allclose(block(x), jax.nn.relu(residual + x), atol=1e-5)
print(f"{len(blocks)} basic blocks; block 1: block(x) == ReLU(F(x) + x)")

resnet.eval()
print("resnet20 forward: (2, 32, 32, 3) ->", resnet(jnp.zeros((2, 32, 32, 3))).shape)
resnet50 = models.abstract_model("resnet50", num_classes=1000)
r50_params, r50_flops = models.param_count(resnet50), models.flops(resnet50, (224, 224, 3))
print(f"resnet50: {r50_params:,} parameters, {r50_flops / 2e9:.2f} G multiply-adds (the paper: 3.8 G); "
      "forward (abstract):", abstract_forward(resnet50, (224, 224, 3)))  # fmt: skip
assert r50_params == 25_557_032 and abs(r50_flops / 2 / 3.8e9 - 1) < 0.02

# %% [markdown]
# The full table of every model's parameters and FLOPs is in [Layers and models](../models.html); the experiment
# `experiments/degradation.py` trains plain and residual nets of depth 20 and 56 and shows the degradation problem
# that the shortcut solves ([Experiments](../experiments.html)).
