"""The datasets convlib knows, in one table.

Each :class:`DatasetSpec` names a dataset's source format, image shape, classes, normalisation statistics and where
its files come from. Everything else is read from here: ``DATASETS``, ``MEAN_STD``, the TFDS builders' configs,
the IDX sources and the training script's ``--dataset`` choices. A new dataset in a known format is one entry in
``SPECS`` (docs/guides/new-dataset.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convlib.data import cifar

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One image-classification dataset: what :func:`convlib.data.load` returns for it and where it comes from.

    Attributes:
      name: the name ``load`` takes.
      format: how its source is stored: ``"idx"`` (the four MNIST-format IDX files) or ``"cifar10_python"`` (the
        official CIFAR-10 python archive); ``convlib.data.datasets`` holds each format's reader and TFDS builder.
      image_shape: (H, W, C) of one uint8 image.
      class_names: one per label 0 .. C-1.
      mean_std: per-channel ``(mean, std)`` of the training images in [0, 1] units (for ``normalize``).
      description: one line for the TFDS dataset info.
      url: where the source files are published (IDX: the base URL of the four ``.gz`` files, downloaded from
        there when allowed; other formats: shown in the message saying what to download).
      debian_package, debian_dir: a Debian package that installs the source files, and the folder it puts them in.

    >>> spec("fashion_mnist").image_shape
    (28, 28, 1)
    """

    name: str
    format: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    description: str
    url: str
    debian_package: str | None = None
    debian_dir: Path | None = None

    @property
    def num_classes(self) -> int:
        """How many classes (labels lie in [0, num_classes))."""
        return len(self.class_names)


SPECS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            name="cifar10",
            format="cifar10_python",
            image_shape=cifar.IMAGE_SHAPE,
            class_names=cifar.CLASSES,
            # Over all 50k x 32 x 32 training pixels per channel, as channel_stats computes them (the usual values).
            mean_std=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            description="CIFAR-10 (Krizhevsky 2009), 50k train / 10k test, from cifar-10-python.tar.gz.",
            url=cifar.URL,
        ),
        DatasetSpec(
            name="fashion_mnist",
            format="idx",
            image_shape=(28, 28, 1),
            class_names=FASHION_MNIST_CLASSES,
            mean_std=((0.2860,), (0.3530,)),  # checked against the data by tests/test_data.py
            description="Fashion-MNIST (Xiao et al. 2017), 60k train / 10k test.",
            url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            debian_package="dataset-fashion-mnist",
            debian_dir=Path("/usr/share/datasets/fashion-mnist"),
        ),
        DatasetSpec(
            name="mnist",
            format="idx",
            image_shape=(28, 28, 1),
            class_names=DIGIT_CLASSES,
            mean_std=((0.1307,), (0.3081,)),
            description="MNIST digits (LeCun et al. 1998), 60k train / 10k test.",
            url="https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    )
}
"""Every dataset :func:`convlib.data.load` takes, by name: the one place a dataset is described."""

DATASETS = tuple(SPECS)
"""The names :func:`convlib.data.load` takes (the training script's ``--dataset`` choices)."""

MEAN_STD = {name: s.mean_std for name, s in SPECS.items()}
"""Per-channel `(mean, std)` of each dataset's training images, in [0, 1] units (for :func:`normalize`)."""


def spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of dataset ``name`` (one of ``DATASETS``).

    >>> spec("cifar10").mean_std[0]
    (0.4914, 0.4822, 0.4465)
    """
    if name not in SPECS:
        raise ValueError(f"name={name!r}: expected one of {list(DATASETS)}")
    return SPECS[name]
