"""convlib.models: registry, parameter counts and FLOPs against derivations, output shapes, model specifics.

ImageNet-size models are only ever built abstractly (`abstract_model`, i.e. `nnx.eval_shape`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convlib import models, nn, ops

NAMES = (
    "lenet5 lenet5_modern alexnet alexnet_small "
    "vgg11 vgg13 vgg16 vgg19 vgg11_bn vgg13_bn vgg16_bn vgg19_bn "
    "vgg11_small vgg13_small vgg16_small vgg19_small vgg11_bn_small vgg13_bn_small vgg16_bn_small vgg19_bn_small "
    "resnet20 resnet32 resnet44 resnet56 resnet110 plain20 plain32 plain44 plain56 plain110 "
    "resnet18 resnet34 resnet50 resnet101 resnet152 context_basic context_large"
).split()
IMAGENET = {
    "alexnet",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
}


def rngs(seed=0):
    # RBG keys: XLA's RngBitGenerator compiles far faster on CPU than threefry.
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"), dropout=jax.random.key(seed + 1, impl="rbg"))


@functools.cache
def abstract(name, **options):
    return models.abstract_model(name, **options)


def output_shape(model, x_shape):
    graphdef, state = nnx.split(model)
    return jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(x_shape, jnp.float32)
    ).shape


# --------------------------------------------------------------------------- registry


def test_available_lists_exactly_the_names():
    assert set(models.available()) == set(NAMES)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="resnet20") as error:
        models.create("resnet21", rngs=rngs())
    assert all(name in str(error.value) for name in NAMES)


def test_bad_options_name_the_parameter():
    for name, options, parameter in [
        ("vgg11", dict(config="D"), "config"),
        ("lenet5", dict(head="svm"), "head"),
        ("lenet5_modern", dict(input_size=34), "input_size"),
        ("lenet5_modern", dict(activation="gelu"), "activation"),
        ("resnet20", dict(shortcut="C"), "shortcut"),
        ("context_basic", dict(in_channels=3), "in_channels"),
        ("context_large", dict(init="zeros"), "init"),
    ]:
        with pytest.raises(ValueError, match=parameter):
            models.create(name, rngs=rngs(), **options)
    with pytest.raises(ValueError, match="depth"):
        models.CifarResNet(depth=21, rngs=rngs())
    for options, parameter in [
        (dict(block="wide"), "block"),
        (dict(stem="none"), "stem"),
        (dict(widths=(8, 8)), "widths"),
        (dict(residual="yes"), "residual"),
    ]:
        with pytest.raises(ValueError, match=parameter):
            models.ResNet(rngs=rngs(), **options)


# --------------------------------------------------------------------------- parameter counts

# Derivations, one formula per layer: conv(k, c_in, c_out) = k*k*c_in/groups*c_out (+ c_out bias),
# batch norm = 2 c (scale and offset; running statistics are not trainable), fc(i, o) = i*o + o.


def conv(k, c_in, c_out, groups=1, bias=True):
    return k * k * c_in // groups * c_out + (c_out if bias else 0)


def fc(i, o):
    return i * o + o


def bn(c):
    return 2 * c


def test_lenet5_c3_and_whole_net():
    model = abstract("lenet5", in_channels=1, head="rbf")
    c3 = 25 * (6 * 3 + 6 * 4 + 3 * 4 + 1 * 6) + 16
    assert c3 == 1516 and models.param_count(model.c3) == c3
    expected = conv(5, 1, 6) + 2 * 6 + c3 + 2 * 16 + conv(5, 16, 120) + fc(120, 84)
    assert expected == 60_000  # the paper's count of free parameters (the RBF prototypes are fixed)
    assert models.param_count(model) == expected
    assert models.param_count(abstract("lenet5", in_channels=1)) == expected + fc(84, 10)


def test_lenet5_modern():
    model = abstract("lenet5_modern", in_channels=1, input_size=28)
    expected = conv(5, 1, 6) + conv(5, 6, 16) + fc(16 * 5 * 5, 120) + fc(120, 84) + fc(84, 10)
    assert models.param_count(model) == expected


def test_alexnet():
    model = abstract("alexnet", num_classes=1000)
    expected = (
        conv(11, 3, 96)
        + conv(5, 96, 256, groups=2)
        + conv(3, 256, 384)
        + conv(3, 384, 384, groups=2)
        + conv(3, 384, 256, groups=2)
        + fc(256 * 6 * 6, 4096)
        + fc(4096, 4096)
        + fc(4096, 1000)
    )
    assert models.param_count(model) == expected
    assert round(expected / 1e6) == 61


VGG_CONVS = {  # (kernel, c_out) of every conv, Table 1 of Simonyan and Zisserman
    "A": [(3, 64), (3, 128), (3, 256), (3, 256)] + [(3, 512)] * 4,
    "B": [(3, 64)] * 2 + [(3, 128)] * 2 + [(3, 256)] * 2 + [(3, 512)] * 4,
    "C": [(3, 64)] * 2 + [(3, 128)] * 2 + [(3, 256)] * 2 + [(1, 256)] + ([(3, 512)] * 2 + [(1, 512)]) * 2,
    "D": [(3, 64)] * 2 + [(3, 128)] * 2 + [(3, 256)] * 3 + [(3, 512)] * 6,
    "E": [(3, 64)] * 2 + [(3, 128)] * 2 + [(3, 256)] * 4 + [(3, 512)] * 8,
}
VGG_PAPER_MILLIONS = {"A": 133, "B": 133, "C": 134, "D": 138, "E": 144}  # Table 2


def vgg_count(config, batch_norm, hidden, flat, num_classes):
    total, c_in = 0, 3
    for k, c_out in VGG_CONVS[config]:
        total += conv(k, c_in, c_out, bias=not batch_norm) + (bn(c_out) if batch_norm else 0)
        c_in = c_out
    return total + fc(flat, hidden) + fc(hidden, hidden) + fc(hidden, num_classes)


@pytest.mark.parametrize(
    "name, config", [("vgg11", "A"), ("vgg13", "B"), ("vgg16", "C"), ("vgg16", "D"), ("vgg19", "E")]
)
def test_vgg(name, config):
    model = abstract(name, num_classes=1000, config=config)
    expected = vgg_count(config, False, 4096, 512 * 7 * 7, 1000)
    assert models.param_count(model) == expected
    assert round(expected / 1e6) == VGG_PAPER_MILLIONS[config]


def test_vgg_bn_and_small():
    assert models.param_count(abstract("vgg16_bn", num_classes=1000)) == vgg_count("D", True, 4096, 25088, 1000)
    assert models.param_count(abstract("vgg11_small")) == vgg_count("A", False, 512, 512, 10)
    assert models.param_count(abstract("vgg19_bn_small")) == vgg_count("E", True, 512, 512, 10)


def cifar_resnet_count(depth, num_classes=10):
    n = (depth - 2) // 6
    total, c_in = conv(3, 3, 16, bias=False) + bn(16), 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(3, c_in, width, bias=False) + bn(width) + conv(3, width, width, bias=False) + bn(width)
            c_in = width  # option-A shortcuts have no parameters
    return total + fc(64, num_classes)


@pytest.mark.parametrize("depth, paper", [(20, "0.27"), (32, "0.46"), (44, "0.66"), (56, "0.85"), (110, "1.7")])
def test_cifar_resnets_and_plain_twins(depth, paper):
    residual = abstract(f"resnet{depth}")
    plain = abstract(f"plain{depth}")
    assert models.param_count(residual) == models.param_count(plain) == cifar_resnet_count(depth)
    digits = len(paper.split(".")[1])
    assert f"{cifar_resnet_count(depth) / 1e6:.{digits}f}" == paper  # Table 6


def imagenet_resnet_count(depth, num_classes=1000):
    bottleneck = depth >= 50
    stages = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    total, c_in = conv(7, 3, 64, bias=False) + bn(64), 64
    for i, (blocks, width) in enumerate(zip(stages, (64, 128, 256, 512))):
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                c_out = 4 * width
                total += conv(1, c_in, width, bias=False) + conv(3, width, width, bias=False)
                total += conv(1, width, c_out, bias=False) + bn(width) + bn(width) + bn(c_out)
            else:
                c_out = width
                total += conv(3, c_in, width, bias=False) + conv(3, width, width, bias=False) + 2 * bn(width)
            if c_in != c_out or stride != 1:
                total += conv(1, c_in, c_out, bias=False) + bn(c_out)  # option-B projection
            c_in = c_out
    return total + fc(c_in, num_classes)


@pytest.mark.parametrize("depth, millions", [(18, 11.7), (34, 21.8), (50, 25.6), (101, 44.5), (152, 60.2)])
def test_imagenet_resnets(depth, millions):
    assert models.param_count(abstract(f"resnet{depth}", num_classes=1000)) == imagenet_resnet_count(depth)
    assert round(imagenet_resnet_count(depth) / 1e6, 1) == millions


def test_context_modules():
    c = 5
    basic = 7 * conv(3, c, c) + conv(1, c, c)
    widths = [2 * c, 2 * c, 4 * c, 8 * c, 16 * c, 32 * c, 32 * c]
    large = sum(conv(3, a, b) for a, b in zip([c] + widths[:-1], widths)) + conv(1, 32 * c, c)
    assert models.param_count(abstract("context_basic", num_classes=c)) == basic
    assert models.param_count(abstract("context_large", num_classes=c)) == large


# --------------------------------------------------------------------------- output shapes


def default_options(name):
    """The options the count tests build each model with (one abstract build per model)."""
    if name.startswith("context"):
        return dict(num_classes=5)
    return dict(num_classes=1000) if name in IMAGENET else {}


def shape_cases():
    for name in NAMES:  # every model at its own input size
        options = default_options(name)
        if name.startswith("context"):
            yield name, options, (2, 28, 28, 5), (2, 28, 28, 5)
        elif name in IMAGENET:
            yield name, options, (1, 224, 224, 3), (1, 1000)
        else:
            yield name, options, (2, 32, 32, 3), (2, 10)
    # every family at every input size: 28x28 and 32x32, grey and colour
    for name in ("lenet5", "lenet5_modern", "alexnet_small", "vgg11_small", "vgg16_bn_small"):
        for size in (28, 32):
            for channels in (1, 3):
                options = dict(input_size=size, in_channels=channels, num_classes=7)
                yield name, options, (2, size, size, channels), (2, 7)
    for name in ("resnet20", "plain32", "resnet18", "resnet50"):
        for size, channels in ((28, 1), (32, 1), (28, 3)):
            yield name, dict(in_channels=channels, num_classes=7), (2, size, size, channels), (2, 7)
    yield "context_large", dict(num_classes=3), (1, 32, 40, 3), (1, 32, 40, 3)
    yield "alexnet", dict(num_classes=1000, input_size=227), (1, 227, 227, 3), (1, 1000)
    yield "vgg16", dict(num_classes=1000, config="C"), (1, 224, 224, 3), (1, 1000)


@pytest.mark.parametrize("name, options, x_shape, y_shape", list(shape_cases()))
def test_output_shapes(name, options, x_shape, y_shape):
    assert output_shape(abstract(name, **options), x_shape) == y_shape


def test_input_size_mismatch_is_a_clear_error():
    model = abstract("lenet5_modern")
    with pytest.raises(ValueError, match="input_size=32"):
        output_shape(model, (1, 28, 28, 3))


def test_backward_and_dtype_reach_every_layer():
    for name, options in [
        ("lenet5", dict(head="rbf")),
        ("lenet5_modern", {}),
        ("alexnet_small", {}),
        ("vgg11_bn_small", {}),
        ("resnet20", {}),
        ("context_large", {}),
    ]:
        model = models.abstract_model(name, backward="textbook", dtype=jnp.bfloat16, **options)
        layers = [
            m for _, m in nnx.iter_graph(model) if isinstance(m, (nn.Conv, nn.MaxPool, nn.AvgPool, nn.GlobalAvgPool))
        ]
        assert layers and all(layer.backward == "textbook" for layer in layers), name
        with_params = [m for _, m in nnx.iter_graph(model) if isinstance(m, (nn.Conv, nnx.Linear, nnx.BatchNorm))]
        assert all(m.dtype == jnp.bfloat16 for m in with_params), name
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param))), name
    resnet = models.abstract_model("resnet56", backward="autodiff")
    convs = [m for _, m in nnx.iter_graph(resnet) if isinstance(m, nn.Conv)]
    assert len(convs) == 55 and {m.backward for m in convs} == {"autodiff"}


@pytest.mark.parametrize("backward", ops.BACKWARDS)
def test_every_backward_mode_of_the_ops_passes_through_a_model(backward):
    """Models and the layer factory hold no list of modes: whatever convlib.ops accepts reaches every layer."""
    model = models.abstract_model("resnet20", backward=backward)
    kinds = (nn.Conv, nn.MaxPool, nn.AvgPool, nn.GlobalAvgPool)
    assert {m.backward for _, m in nnx.iter_graph(model) if isinstance(m, kinds)} == {backward}


@pytest.mark.parametrize("name, options", [("resnet20", {}), ("lenet5", dict(head="rbf")), ("alexnet_small", {})])
def test_mixed_precision_output(name, options):
    graphdef, state = nnx.split(models.abstract_model(name, dtype=jnp.bfloat16, **options))
    y = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert y.dtype == jnp.bfloat16


# --------------------------------------------------------------------------- FLOPs


def test_flops_of_lenet5_modern_by_hand():
    macs = 28 * 28 * 6 * (5 * 5 * 3) + 10 * 10 * 16 * (5 * 5 * 6) + 400 * 120 + 120 * 84 + 84 * 10
    assert models.flops("lenet5_modern", (32, 32, 3)) == 2 * macs
    model = models.create("lenet5_modern", in_channels=1, input_size=28, rngs=rngs())
    assert models.flops(model, (28, 28, 1)) == 2 * (macs - 28 * 28 * 6 * 25 * 2)


def test_flops_of_grouped_and_strided_convs_by_hand():
    macs = 55 * 55 * 96 * (11 * 11 * 3) + 27 * 27 * 256 * (5 * 5 * 48) + 13 * 13 * 384 * (3 * 3 * 256)
    macs += 13 * 13 * 384 * (3 * 3 * 192) + 13 * 13 * 256 * (3 * 3 * 192) + 9216 * 4096 + 4096 * 4096 + 4096 * 1000
    assert models.flops(abstract("alexnet", num_classes=1000), (224, 224, 3)) == 2 * macs


@pytest.mark.parametrize(
    "name, paper", [("resnet34", 3.6e9), ("resnet50", 3.8e9), ("resnet152", 11.3e9), ("vgg19", 19.6e9)]
)
def test_flops_agree_with_the_resnet_paper(name, paper):
    # He et al. (2016), Table 1 and Section 4.1: their "FLOPs" are multiply-adds.
    macs = models.flops(abstract(name, num_classes=1000), (224, 224, 3)) / 2
    assert abs(macs - paper) < 0.02 * paper


# --------------------------------------------------------------------------- LeNet-5


def test_c3_connection_table():
    rows = models.C3_TABLE
    assert len(rows) == 16 and sum(map(len, rows)) == 60
    assert all(len(r) == 3 and r == tuple((r[0] + i) % 6 for i in range(3)) for r in rows[:6])
    assert all(len(r) == 4 and r == tuple((r[0] + i) % 6 for i in range(4)) for r in rows[6:12])
    assert all(len(r) == 4 and sorted(r) != [(r[0] + i) % 6 for i in range(4)] for r in rows[12:15])
    assert rows[15] == tuple(range(6))


def test_c3_reads_only_the_table_connections():
    model = models.create("lenet5", in_channels=1, rngs=rngs())
    x = jax.random.normal(jax.random.key(3), (1, 14, 14, 6))
    jacobian = jax.jit(jax.jacrev(lambda x: jnp.sum(model.c3(x), axis=(0, 1, 2))))(x)  # (16, 1, 14, 14, 6)
    reads = np.asarray(jnp.any(jacobian != 0, axis=(1, 2, 3)))
    expected = np.zeros((16, 6), bool)
    for j, row in enumerate(models.C3_TABLE):
        expected[j, list(row)] = True
    np.testing.assert_array_equal(reads, expected)


def test_lenet5_rbf_head_gives_distances_to_fixed_prototypes():
    model = models.create("lenet5", in_channels=1, head="rbf", num_classes=10, rngs=rngs())
    prototypes = model.output.prototypes[...]
    assert prototypes.shape == (10, 84) and set(np.unique(prototypes)) == {-1.0, 1.0}
    assert not jax.tree.leaves(nnx.state(model.output, nnx.Param))
    x = jax.random.normal(jax.random.key(4), (3, 32, 32, 1))
    f6 = jax.random.normal(jax.random.key(5), (3, 84))
    distances = model.output(f6)
    np.testing.assert_allclose(distances, ((f6[:, None, :] - prototypes[None]) ** 2).sum(-1), rtol=1e-5)
    assert model(x).shape == (3, 10) and bool(jnp.all(model(x) >= 0))


def test_lenet5_modern_pads_28_to_the_32_field():
    padded = models.create("lenet5_modern", in_channels=1, input_size=28, rngs=rngs())
    field = models.create("lenet5_modern", in_channels=1, input_size=32, rngs=rngs())
    x = jax.random.normal(jax.random.key(6), (2, 28, 28, 1))
    np.testing.assert_allclose(padded(x), field(jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- train / eval


def test_train_and_eval_switch_dropout_and_batch_norm():
    model = models.create("vgg11_bn_small", widths=(4, 4, 4, 4, 4), hidden=32, dropout=0.5, rngs=rngs())
    forward = nnx.jit(lambda model, x: model(x))
    x = jax.random.normal(jax.random.key(7), (4, 32, 32, 3))

    def statistics():
        return [np.array(a) for a in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    before = statistics()
    assert not jnp.allclose(forward(model, x), forward(model, x))  # fresh dropout masks, batch statistics
    assert not any(np.array_equal(a, b) for a, b in zip(before, statistics()))
    model.eval()
    before = statistics()
    np.testing.assert_array_equal(forward(model, x), forward(model, x))
    assert all(np.array_equal(a, b) for a, b in zip(before, statistics()))


# --------------------------------------------------------------------------- context module


@pytest.mark.parametrize("size, noise, tolerance", [("basic", 1e-3, 0.0), ("large", 0.0, 1e-6), ("large", 1e-3, 0.1)])
def test_context_identity_init_passes_the_input_through(size, noise, tolerance):
    model = models.create(f"context_{size}", num_classes=2, init_noise=noise, rngs=rngs())
    x = jnp.abs(jax.random.normal(jax.random.key(8), (1, 12, 12, 2)))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), x, rtol=tolerance, atol=tolerance)


def test_context_receptive_field_grows_as_in_table_1():
    model = models.create("context_basic", num_classes=1, init="random", rngs=rngs())
    for layer in model.layers:  # all-ones weights and a positive input: every path is active
        layer.kernel[...] = jnp.ones_like(layer.kernel[...])
    size = 71
    centre = size // 2

    def centre_units(x):
        units = []
        for layer in model.layers:
            x = jax.nn.relu(layer(x))
            units.append(x[0, centre, centre, 0])
        return jnp.stack(units)

    x = jnp.ones((1, size, size, 1))
    jacobian = jax.jit(jax.jacrev(centre_units))(x)[..., 0]  # (8, 1, size, size)
    measured = []
    for g in jacobian:
        rows, cols = np.nonzero(np.asarray(g[0]))
        assert rows.max() - rows.min() == cols.max() - cols.min()
        measured.append(int(rows.max() - rows.min() + 1))
    assert measured == [3, 5, 9, 17, 33, 65, 67, 67]
    formula = ops.receptive_fields([layer.geometry((size, size)) for layer in model.layers])
    assert [f.size[0] for f in formula] == measured


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_an_nchw_resnet_computes_what_the_nhwc_one_does(shortcut):
    """Every layer honours `layout`: convs, pools, BatchNorm and the option-A shortcut's strides and padding."""
    options = dict(depth=8, widths=(4, 8, 16), shortcut=shortcut, rngs=rngs())
    nhwc, nchw = models.CifarResNet(**options), models.CifarResNet(layout="NCHW", **options)
    state = nnx.state(nhwc)
    state = jax.tree.map(lambda a: jnp.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a, state)
    nnx.update(nchw, state)  # HWIO kernels to OIHW
    nhwc.eval(), nchw.eval()
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
    np.testing.assert_allclose(nchw(jnp.transpose(x, (0, 3, 1, 2))), nhwc(x), rtol=1e-5, atol=1e-5)


def test_presets_build_one_resnet_class_and_answer_isinstance():
    cifar, imagenet = abstract("resnet20"), abstract("resnet18")
    assert type(cifar) is type(imagenet) is models.ResNet
    assert isinstance(cifar, models.CifarResNet) and not isinstance(cifar, models.ImageNetResNet)
    assert isinstance(imagenet, models.ImageNetResNet) and not isinstance(imagenet, models.CifarResNet)
    assert not isinstance(models.abstract_model("lenet5"), models.CifarResNet)
    assert models.accepted_options("resnet20") == models.accepted_options("resnet50")
