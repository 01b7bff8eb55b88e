"""TFDS datasets from local files, prepared and read without TensorFlow or a network.

Two builders (``tfds.core.GeneratorBasedBuilder``) write ``array_record`` files with ``Tensor`` features (no ``Image``
feature: encoding it needs TensorFlow); their sources are TFDS's ``manual_dir``
(``tfds.download.DownloadConfig(manual_dir=...)``, or ``tfds build --manual_dir``):

- ``IdxImages`` (configs ``fashion_mnist``, ``mnist``): the four MNIST-format IDX files; prepared into
  ``<data_dir>/convlib_idx/<name>/<VERSION>/``.
- ``Cifar10Images``: the official ``cifar-10-python.tar.gz`` or its extracted folder (``convlib.data.cifar``);
  prepared into ``<data_dir>/convlib_cifar10/<VERSION>/``.

``load`` is the entry point for training code: find the source files, prepare once, read back through the TFDS
data source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from convlib.data import cifar, idx
from convlib.data.sources import apt_get_install, ensure_idx_files

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


def _image_label_info(image_shape, class_names) -> dict:
    """The DatasetInfo fields both offline builders share: uint8 images stored as raw bytes (not the default int64
    list: preparing is ~3x faster), class labels, and the source files' order kept (no shuffling)."""
    features = {
        "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=list(class_names)),
    }
    return dict(
        features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label"), disable_shuffling=True
    )


@dataclasses.dataclass(eq=False)
class IdxConfig(tfds.core.BuilderConfig):
    """A dataset stored as the four standard IDX files; images (H, W) grayscale."""

    class_names: tuple[str, ...] = DIGIT_CLASSES
    image_shape: tuple[int, int, int] = (28, 28, 1)


class IdxImages(tfds.core.GeneratorBasedBuilder):
    """Grayscale image classification from the four standard IDX files in ``manual_dir``."""

    name = "convlib_idx"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "Images stored as raw bytes (Tensor BYTES encoding).",
    }
    BUILDER_CONFIGS: ClassVar[list[IdxConfig]] = [
        IdxConfig(
            name="fashion_mnist",
            class_names=FASHION_MNIST_CLASSES,
            description="Fashion-MNIST (Xiao et al. 2017), 60k train / 10k test.",
        ),
        IdxConfig(
            name="mnist",
            class_names=DIGIT_CLASSES,
            description="MNIST digits (LeCun et al. 1998), 60k train / 10k test.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the four IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzip or not) in manual_dir."
    )

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(**_image_label_info(config.image_shape, config.class_names))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # Read and validate every file before anything is written.
        config = self.builder_config
        arrays = {
            split: idx.read_idx_split(dl_manager.manual_dir, split, len(config.class_names))
            for split in idx.SPLIT_FILES
        }
        for split, (images, _) in arrays.items():
            if images.shape[1:] != config.image_shape[:2]:
                stem = idx.SPLIT_FILES[split][0]
                raise ValueError(
                    f"IDX file {idx.find_idx_file(dl_manager.manual_dir, stem)} has images of "
                    f"shape {images.shape[1:]}, expected {config.image_shape[:2]} for {config.name}"
                )
        return {split: self._generate_examples(*arrays[split]) for split in arrays}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


class Cifar10Images(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 (Krizhevsky 2009), 50k train / 10k test, from the official python archive in ``manual_dir``."""

    name = "convlib_cifar10"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {cifar.URL} and put it (or its extracted folder {cifar.FOLDER}/) in manual_dir."
    )

    def __init__(self, *, source: os.PathLike | str | None = None, **kwargs):
        """``source``: the archive or folder to read (default: found in ``manual_dir``, see ``cifar.find_source``)."""
        self._source = source
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            **_image_label_info(cifar.IMAGE_SHAPE, cifar.CLASSES),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # Read and check every batch before anything is written.
        splits = cifar.read_cifar10(self._source or dl_manager.manual_dir)
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


def default_data_dir() -> Path:
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, read at call time."""
    return Path(tfds.core.constants.get_default_data_dir()).expanduser()


def prepare(
    name: str = "fashion_mnist",
    *,
    data_dir: os.PathLike | str | None = None,
    source_dir: os.PathLike | str | None = None,
    apt_install: Callable[[str], bool] | None = apt_get_install,
    download: bool = True,
) -> IdxImages | Cifar10Images:
    """Prepares dataset ``name`` (one of ``DATASETS``) under ``data_dir`` once; returns the builder.

    Already prepared: nothing is read or written. Otherwise the sources are found: for ``cifar10`` the archive or
    folder in ``source_dir`` (default ``<data_dir>/downloads/manual``, TFDS's manual dir; never downloaded); for
    the IDX datasets by ``ensure_idx_files`` (``source_dir``, the Debian package, ``apt_install``, download).
    TFDS writes into an ``incomplete.*`` folder and renames it when done, so a failure leaves no prepared dataset
    behind.
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r}: expected one of {list(DATASETS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "cifar10":
        source = data_dir / "downloads" / "manual" if source_dir is None else Path(source_dir)
        builder = Cifar10Images(data_dir=data_dir, source=source)
        if not builder.data_path.exists():
            found = cifar.find_source(source)  # before TFDS starts: its error would not say where to put the file
            manual_dir = found.parent if found.is_file() else found
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        return builder
    builder = IdxImages(config=name, data_dir=data_dir)
    # The test download_and_prepare itself uses; TFDS renames the folder into place when done.
    if not builder.data_path.exists():
        folder = ensure_idx_files(
            name,
            source_dir,
            apt_install=apt_install,
            download_dir=data_dir / "downloads" if download else None,
        )
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
    return builder


def load(
    name: str = "fashion_mnist",
    split: str = "train",
    *,
    data_dir: os.PathLike | str | None = None,
    source_dir: os.PathLike | str | None = None,
    apt_install: Callable[[str], bool] | None = apt_get_install,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split as NumPy arrays, preparing the TFDS dataset first if needed.

    Args:
      name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
      split: ``"train"`` or ``"test"``.
      data_dir: TFDS data dir; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      source_dir: IDX datasets: folder with the four IDX files (default: see ``ensure_idx_files``); ``cifar10``:
        ``cifar-10-python.tar.gz``, its extracted folder, or a folder holding either (default
        ``<data_dir>/downloads/manual``).
      apt_install: installs a Debian package (``None``: never run apt); IDX datasets only.
      download: allow downloading the IDX files through TFDS's download manager (CIFAR-10 is never downloaded).

    Returns:
      images uint8 (N, 28, 28, 1) (IDX) or (N, 32, 32, 3) (CIFAR-10), labels int32 (N,), in the source files'
      order.
    """
    if split not in idx.SPLIT_FILES:  # CIFAR-10 has the same two splits
        raise ValueError(f"split={split!r}: expected one of {sorted(idx.SPLIT_FILES)}")
    builder = prepare(name, data_dir=data_dir, source_dir=source_dir, apt_install=apt_install, download=download)
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(list(range(len(source))))
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples], dtype=np.int32)
    return images, labels


DATASETS = ("cifar10", *(c.name for c in IdxImages.BUILDER_CONFIGS))
"""The names :func:`load` takes: "cifar10" (the official python archive) and the IDX datasets."""
