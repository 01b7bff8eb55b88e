"""Brief training runs of the experiments: Fashion-MNIST or CIFAR-10 (or a synthetic Fashion-MNIST-shaped stand-in,
for smoke tests) through `convlib.data`, trained with `convlib.train.fit`, evaluated at a few points along the way."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from convlib import data, train

NUM_CLASSES = 10


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --source-dir and --synthetic (the dataset itself is the script's choice)."""
    parser.add_argument(
        "--data-dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    parser.add_argument(
        "--source-dir",
        default=None,
        help="Fashion-MNIST: folder with the four IDX files (default: the Debian package's "
        "/usr/share/datasets/fashion-mnist); CIFAR-10: cifar-10-python.tar.gz, its extracted folder or a folder "
        "holding either (default: DATA_DIR/downloads/manual)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="Fashion-MNIST-shaped synthetic images instead of the real data (always so with --smoke)",
    )


@dataclasses.dataclass(frozen=True)
class Split:
    images: jax.Array  # uint8 (N, H, W, C)
    labels: jax.Array  # int32 (N,)


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    name: str  # "fashion_mnist", "cifar10" or "synthetic"


def synthetic_images(seed: int, n: int, *, template_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST-shaped images, uint8 (n, 28, 28, 1), labels int32 (n,): each class a fixed smooth random
    template (drawn from `template_seed`, so every split shares the classes), shifted by up to 2 pixels, plus
    noise (drawn from `seed`). Learnable, so short training runs go somewhere."""
    coarse = np.random.default_rng(template_seed).uniform(0, 1, (NUM_CLASSES, 7, 7))
    templates = np.kron(coarse, np.ones((4, 4)))  # (10, 28, 28), blocky
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    shifts = rng.integers(-2, 3, (n, 2))
    images = np.stack([np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)])
    images = np.clip(images * 200 + rng.normal(0, 30, images.shape), 0, 255)
    return images.astype(np.uint8)[..., None], labels


def load_splits(
    name: str,
    *,
    synthetic: int | None = None,
    data_dir=None,
    source_dir=None,
    pad_to: int | None = None,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    apt_install=None,
) -> Dataset:
    """The first `train_size` / `test_size` examples (None: all) of dataset `name` (see `convlib.data.load`, which
    also takes `apt_install`), on device, optionally zero-padded to `pad_to` x `pad_to`; with `synthetic`, that many
    synthetic training images (and `test_size`, default a fifth as many, test images) instead."""

    def split(split_name, size):
        if synthetic:
            images, labels = synthetic_images(seed + (split_name == "test"), size)
        else:
            images, labels = data.load(
                name, split_name, data_dir=data_dir, source_dir=source_dir, apt_install=apt_install
            )
            images, labels = images[:size], labels[:size]
        images = jax.device_put(images)
        return Split(images if pad_to is None else data.pad_images(images, to=pad_to), jax.device_put(labels))

    if synthetic:
        train_size, test_size = synthetic, test_size or synthetic // 5
    return Dataset(split("train", train_size), split("test", test_size), "synthetic" if synthetic else name)


def load(
    args: argparse.Namespace,
    *,
    train_size: int | None,
    test_size: int | None,
    pad_to: int | None = None,
    seed: int = 0,
    name: str = "fashion_mnist",
) -> Dataset:
    """`load_splits` for the flags of `add_data_flags`: synthetic images (1000 a split unless sized) with
    `args.synthetic` or `args.size == "smoke"`."""
    if args.synthetic or args.size == "smoke":
        return load_splits(name, synthetic=train_size or 1000, test_size=test_size or 1000, pad_to=pad_to, seed=seed)
    return load_splits(
        name,
        data_dir=args.data_dir,
        source_dir=args.source_dir,
        pad_to=pad_to,
        train_size=train_size,
        test_size=test_size,
    )


def preprocess(images: jax.Array, dataset: str = "fashion_mnist", dtype=jnp.float32) -> jax.Array:
    """uint8 images (N, H, W, C) -> `dtype`, normalised with the per-channel mean and standard deviation of
    `dataset` (a name of `convlib.data.MEAN_STD`; "synthetic": Fashion-MNIST's)."""
    mean, std = data.MEAN_STD["fashion_mnist" if dataset == "synthetic" else dataset]
    return data.normalize(images, mean, std).astype(dtype)


@dataclasses.dataclass
class Training:
    """curve: one dict per evaluation point: step, train_loss / train_error (running means over the steps since the
    last point, training mode), test_loss / test_error; steps: the per-step loss; result: convlib.train's FitResult."""

    curve: list[dict]
    steps: list[dict]
    result: train.FitResult


def fit(
    model,
    dataset: Dataset,
    *,
    steps: int,
    batch_size: int,
    key: jax.Array,
    recipe: train.Recipe,
    evaluations: int = 5,
    eval_batch_size: int = 1000,
    progress: bool = False,
) -> Training:
    """Trains `model` in place for `steps` steps of `recipe` with `convlib.train.fit` over epochs of the training
    split, evaluating on the test split `evaluations` times (evenly spaced, the last at the end)."""
    if steps < 1 or evaluations < 1:
        raise ValueError(f"steps and evaluations must be >= 1, got {steps}, {evaluations}")
    result = train.fit(
        model,
        recipe,
        (dataset.train.images, dataset.train.labels),
        (dataset.test.images, dataset.test.labels),
        key=key,
        loop=train.LoopConfig(
            batch_size=batch_size,
            steps=steps,
            eval_batch_size=eval_batch_size,
            eval_every=-(-steps // min(evaluations, steps)),
        ),
        preprocess=functools.partial(preprocess, dataset=dataset.name),
        log=train.LogConfig(progress=progress),
    )
    curve = [
        {
            "step": r["step"],
            "train_loss": r["train_loss"],
            "train_error": 1 - r["train_accuracy"],
            "test_loss": r["test_loss"],
            "test_error": 1 - r["test_accuracy"],
        }
        for r in result.records
        if r["kind"] == "eval"
    ]
    step_records = [
        {"step": r["step"], "loss": r["loss"], "error": 1 - r["accuracy"]}
        for r in result.records
        if r["kind"] == "step"
    ]
    return Training(curve, step_records, result)
