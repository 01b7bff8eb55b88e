"""Bad calls to every floor above the ops: each raises ValueError/TypeError naming the parameter and the value,
at the boundary, before any JAX computation. One row per call: (what is called, the exception, the name)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from convlib import data, models, nn, ops, train

KEY = jax.random.key(0)
IMAGES, LABELS = np.zeros((8, 28, 28, 1), np.uint8), np.zeros((8,), np.int32)


def rngs():
    return nnx.Rngs(0)


def create(name="lenet5_modern", **options):
    return lambda: models.create(name, rngs=rngs(), **options)


def conv(**options):
    return lambda: nn.Conv(**({"in_features": 4, "out_features": 8, "kernel_size": 3} | options), rngs=rngs())


def fit(**options):
    model = nnx.Linear(2, 2, rngs=rngs())
    args = {"steps_per_epoch": 1, "epochs": 1, "key": KEY} | options
    return lambda: train.fit(model, optax.sgd(0.1), lambda epoch: [], **args)


BAD_CALLS = [
    # models: the common arguments
    (create(num_classes=0), ValueError, "num_classes=0"),
    (create(num_classes=-1), ValueError, "num_classes=-1"),
    (create(num_classes=10.0), TypeError, "num_classes must be an int, got 10.0"),
    (create(num_classes=True), TypeError, "num_classes must be an int, got True"),
    (create("resnet20", num_classes="10"), TypeError, "num_classes must be an int"),
    (create(in_channels=0), ValueError, "in_channels=0"),
    (create("vgg11_small", in_channels=2.5), TypeError, "in_channels must be an int"),
    (create(dtype="float8"), TypeError, "dtype must be a floating dtype.*'float8'"),
    (create(dtype=jnp.int32), TypeError, "dtype must be a floating dtype"),
    (create("resnet20", param_dtype="int8"), TypeError, "param_dtype must be a floating dtype.*'int8'"),
    (create(backward="fast"), ValueError, "backward must be one of .*'fast'"),
    (lambda: models.create("lenet5_modern", rngs=0), TypeError, "rngs must be an nnx.Rngs .*got 0"),
    (create("resnet21"), ValueError, "unknown model 'resnet21'"),
    (lambda: models.create(5, rngs=rngs()), ValueError, "unknown model 5"),
    (create(foo=1), TypeError, "unknown option 'foo' for lenet5_modern; its options: activation"),
    (create("resnet20", input_size=28), TypeError, "unknown option 'input_size' for resnet20"),
    # models: their own options
    (create("alexnet_small", dropout=1.5), ValueError, "dropout must be .*1.5"),
    (create("alexnet_small", dropout=-0.5), ValueError, "dropout must be .*-0.5"),
    (create("vgg11_small", dropout="half"), TypeError, "dropout must be a number"),
    (create("alexnet", dropout=1.0), ValueError, r"dropout must be a finite number in \[0.0, 1.0\)"),
    (create("lenet5", input_size=30), ValueError, "input_size must be one of .* got 30"),
    (create(input_size=34), ValueError, "input_size must be one of .* got 34"),
    (create(input_size=0), ValueError, "input_size=0"),
    (create(activation="gelu"), ValueError, "activation must be one of .*'gelu'"),
    (create(pool="min"), ValueError, "pool must be one of .*'min'"),
    (create(channels=(6, 0)), ValueError, "channels=0"),
    (create(hidden=(120, -1)), ValueError, "hidden=-1"),
    (create("lenet5", head="svm"), ValueError, "head must be one of .*'svm'"),
    (create("vgg11", config="Z"), ValueError, "config must be one of .*'Z'"),
    (create("vgg11", config="D"), ValueError, "config 'D' has depth 16"),
    (create("resnet20", shortcut="C"), ValueError, "shortcut must be one of .*'C'"),
    (create("resnet20", widths=(16, 0, 64)), ValueError, "widths=0"),
    (create("resnet20", widths=(16, 32)), ValueError, "widths must hold 3"),
    (create("resnet20", residual="yes"), TypeError, "residual must be a bool, got 'yes'"),
    (lambda: models.CifarResNet(depth=21, rngs=rngs()), ValueError, "depth must be 6n \\+ 2.*21"),
    (lambda: models.ImageNetResNet(depth=51, rngs=rngs()), ValueError, "depth must be one of .*51"),
    (lambda: models.ResNet(block="wide", rngs=rngs()), ValueError, "block must be one of .*'wide'"),
    (create("context_basic", in_channels=3), ValueError, "in_channels must equal num_classes"),
    (create("context_large", init="zeros"), ValueError, "init must be one of .*'zeros'"),
    (create("context_large", init_noise=-1.0), ValueError, "init_noise must be .*-1.0"),
    # nn layers
    (conv(in_features=0), ValueError, "in_features=0"),
    (conv(out_features=2.0), TypeError, "out_features must be an int"),
    (conv(groups=3), ValueError, "groups=3 must divide"),
    (conv(kernel_size=(3, 0)), ValueError, "kernel_size"),
    (conv(stride=0), ValueError, "stride"),
    (conv(padding="FULL"), ValueError, "padding must be .*'FULL'"),
    (conv(use_bias="no"), TypeError, "use_bias must be a bool, got 'no'"),
    (conv(dtype="float8"), TypeError, "dtype must be a floating dtype"),
    (conv(param_dtype=jnp.int8), TypeError, "param_dtype must be a floating dtype"),
    (conv(output_sharding=3), TypeError, "output_sharding must be None or a mesh axis name.*3"),
    (conv(output_sharding=""), TypeError, "output_sharding must be None or a mesh axis name"),
    (conv(layout="NWHC"), ValueError, "layout must be one of .*'NWHC'"),
    (lambda: nn.Conv(4, 8, 3, rngs=0), TypeError, "rngs must be an nnx.Rngs"),
    (lambda: nn.MaxPool(3, padding=2), ValueError, "padding must be between 0 and half the window .* got 2"),
    (lambda: nn.AvgPool(2, padding=(2, 0)), ValueError, "padding must be between 0 and half the window"),
    (lambda: nn.MaxPool(2, ceil_mode="yes"), TypeError, "ceil_mode must be a bool, got 'yes'"),
    (lambda: nn.AvgPool(2, count_include_pad="False"), TypeError, "count_include_pad must be a bool, got 'False'"),
    (lambda: nn.MaxPool(0), ValueError, "window"),
    (lambda: nn.GlobalAvgPool(layout="CHW"), ValueError, "layout must be one of .*'CHW'"),
    (lambda: nn.LocalResponseNorm(size=0), ValueError, "size=0"),
    (lambda: nn.LocalResponseNorm(alpha=float("nan")), ValueError, "alpha must be a finite number.*nan"),
    (lambda: nn.LocalResponseNorm(beta="x"), TypeError, "beta must be a number, got 'x'"),
    (lambda: nn.LocalResponseNorm(k=0.0), ValueError, "k must be a finite number > 0.0, got 0.0"),
    # ops.receptive_fields: only Geometry stacks
    (lambda: ops.receptive_fields([{"kernel": 3}]), TypeError, r"layers\[0\] must be an ops.Geometry.*'kernel'"),
    (lambda: ops.receptive_fields([(3, 1, 1)]), TypeError, r"layers\[0\] must be an ops.Geometry.*\(3, 1, 1\)"),
    (lambda: ops.receptive_fields(ops.make_geometry(2, 3)), TypeError, "layers must be a sequence of ops.Geometry"),
    (lambda: ops.receptive_field("conv3"), TypeError, "layers must be a sequence.*'conv3'"),
    (lambda: ops.receptive_fields([]), ValueError, "at least one Geometry"),
    # data
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 0)), ValueError, "batch_size=0"),
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 2.5)), TypeError, "batch_size must be an int, got 2.5"),
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 100)), ValueError, "batch_size=100 is larger than the 8"),
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 2, shuffle="no")), TypeError, "shuffle must be a bool"),
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 2, drop_remainder=1)), TypeError, "drop_remainder must be"),
    (lambda: next(data.batches(0, IMAGES, LABELS, 2)), TypeError, "key must be a typed PRNG key.*got 0"),
    (lambda: next(data.batches(KEY, IMAGES, LABELS[:5], 2)), ValueError, r"labels: expected shape \(8,\)"),
    (lambda: next(data.batches(KEY, IMAGES[0], LABELS, 2)), ValueError, r"images: expected shape \(N, H, W, C\)"),
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 2, process_count=0)), ValueError, "process_count=0"),
    (
        lambda: next(data.batches(KEY, IMAGES, LABELS, 2, process_index=2, process_count=2)),
        ValueError,
        "process_index=2",
    ),
    (lambda: next(data.batches(KEY, IMAGES, LABELS, 3, process_count=2)), ValueError, "batch_size 3 is not divisible"),
    (lambda: data.random_crop(KEY, IMAGES, -1), ValueError, "padding=-1"),
    (
        lambda: data.random_crop(KEY, IMAGES, 28),
        ValueError,
        r"padding=28 is out of range: expected an int in \[0, 27\]",
    ),
    (lambda: data.random_crop(KEY, IMAGES, 2.0), TypeError, "padding must be an int"),
    (lambda: data.random_crop(1, IMAGES), TypeError, "key must be a typed PRNG key"),
    (lambda: data.random_flip(KEY, IMAGES[0]), ValueError, "images: expected shape"),
    (lambda: data.pad_images(IMAGES, 20), ValueError, "to=20"),
    (lambda: data.normalize(IMAGES, 0.5, 0.0), ValueError, "std must be positive and finite, got 0.0"),
    (lambda: data.normalize(IMAGES, 0.5, float("nan")), ValueError, "std must be positive and finite"),
    (lambda: data.channel_stats(IMAGES.astype(np.float32)), TypeError, "images: expected dtype uint8"),
    (lambda: data.load("mnist2"), ValueError, "name='mnist2'"),
    # train
    (lambda: train.make_optimizer("adamw2", 0.1), ValueError, "optimizer must be one of .*'adamw2'"),
    (lambda: train.make_optimizer("sgd", 0.1, momentum=1.5), ValueError, "momentum must be .*1.5"),
    (lambda: train.make_optimizer("sgd", 0.1, weight_decay=-1.0), ValueError, "weight_decay must be .*-1.0"),
    (lambda: train.make_optimizer("sgd", float("inf")), ValueError, "learning_rate must be a finite number"),
    (lambda: train.make_optimizer("sgd", "0.1"), TypeError, "learning_rate must be a number"),
    (lambda: train.make_schedule("cosine2", 0.1, total_steps=10), ValueError, "schedule must be one of .*'cosine2'"),
    (lambda: train.make_schedule("cosine", -0.1, total_steps=10), ValueError, "base_lr must be .*-0.1"),
    (lambda: train.make_schedule("cosine", 0.1, total_steps=0), ValueError, "total_steps=0"),
    (lambda: train.make_schedule("cosine", 0.1, total_steps=10, warmup_steps=10), ValueError, "warmup_steps must be"),
    (lambda: train.make_schedule("piecewise", 0.1, total_steps=10, boundaries=(5, 2)), ValueError, "boundaries must"),
    (lambda: train.make_schedule("piecewise", 0.1, total_steps=10, boundaries=(2.5,)), TypeError, "boundaries must be"),
    (lambda: train.make_loss("hinge"), ValueError, "loss must be .*'hinge'"),
    (lambda: train.Recipe(optimizer="sgdd"), ValueError, "optimizer must be one of .*'sgdd'"),
    (lambda: train.Recipe(learning_rate=float("nan")), ValueError, "learning_rate must be .*nan"),
    (lambda: train.Recipe(learning_rate=0.0), ValueError, "learning_rate must be a finite number > 0.0"),
    (lambda: train.Recipe(crop_padding=-1), ValueError, "crop_padding=-1"),
    (lambda: train.Recipe(momentum=1.0), ValueError, "momentum must be"),
    (lambda: train.create_train_state(nnx.Linear(2, 2, rngs=rngs()), "sgd", KEY), TypeError, "tx must be an optax"),
    (lambda: train.create_train_state("lenet5", optax.sgd(0.1), KEY), TypeError, "model must be an nnx.Module"),
    (lambda: train.create_train_state(nnx.Linear(2, 2, rngs=rngs()), optax.sgd(0.1), 0), TypeError, "key must be"),
    (fit(epochs=0), ValueError, "epochs=0"),
    (fit(steps_per_epoch=-1), ValueError, "steps_per_epoch=-1"),
    (fit(max_steps=0), ValueError, "max_steps=0"),
    (fit(checkpoint_every=-1), ValueError, "checkpoint_every=-1"),
    (fit(eval_every=0), ValueError, "eval_every=0"),
    (fit(resume="yes"), ValueError, "resume must be one of .*'yes'"),
    (fit(progress="no"), TypeError, "progress must be a bool"),
    (fit(loss="cross_entropy"), TypeError, "loss must be a convlib.train.Loss"),
    (fit(parallel="pmap2"), ValueError, "parallel must be one of .*'pmap2'"),
    (fit(key=0), TypeError, "key must be a typed PRNG key"),
    (fit(checkpoint_dir="/tmp/unused", on_corrupt_checkpoint="ignore"), ValueError, "on_corrupt must be one of"),
]


@pytest.mark.parametrize(
    "call, error, message", BAD_CALLS, ids=[f"{i}:{m[:40]}" for i, (_, _, m) in enumerate(BAD_CALLS)]
)
def test_a_bad_call_raises_naming_the_parameter_and_the_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_the_table_is_large():
    assert len(BAD_CALLS) >= 60


@pytest.mark.parametrize("name", ["lenet5_modern", "resnet20", "alexnet_small"])
@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_gives_empty_logits(name, training):
    options = {"input_size": 28} if name == "lenet5_modern" else {}
    model = models.create(name, in_channels=1, rngs=nnx.Rngs(0), **options)
    model.train() if training else model.eval()
    size = 28 if name == "lenet5_modern" else 32
    logits = nnx.jit(lambda model, x: model(x))(model, jnp.zeros((0, size, size, 1)))
    assert logits.shape == (0, 10)
