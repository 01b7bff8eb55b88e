"""Datasets through TFDS (offline builders: IDX files, the CIFAR-10 python archive) and the device-side pipeline.

The datasets are described in one table, ``convlib.data.registry.SPECS`` (``spec(name)``: image shape, classes,
``mean_std``, where the files come from). Typical use::

    images, labels = convlib.data.load("fashion_mnist", "train")   # uint8 (N,28,28,1), int32 (N,)
    images = convlib.data.pad_images(jax.device_put(images), to=32)
    crop = functools.partial(convlib.data.random_crop, padding=4)   # built once, reused
    for batch in convlib.data.batches(epoch_key, images, labels, 128, transform=crop):
        ...  # batch["image"]: (128, 32, 32, 1) uint8, batch["label"]: (128,) int32

``load`` never installs anything unless asked (``apt_install=apt_get_install``): a missing dataset stops with one
line naming the command that installs it or where to put its files.
"""

from convlib.data.augment import (
    channel_stats,
    check_crop_padding,
    normalize,
    pad_images,
    random_crop,
    random_flip,
)
from convlib.data.cifar import read_cifar10
from convlib.data.datasets import (
    FORMATS,
    SOURCE_RECORD,
    Cifar10Images,
    DatasetError,
    IdxImages,
    OfflineImages,
    PreparationInterrupted,
    SourceFormat,
    default_data_dir,
    load,
    prepare,
    provenance,
)
from convlib.data.idx import read_idx, read_idx_split
from convlib.data.pipeline import batches, pipeline_throughput
from convlib.data.registry import DATASETS, MEAN_STD, SPECS, DatasetSpec, spec
from convlib.data.sources import IDX_SOURCES, IdxSource, apt_get_install, ensure_idx_files

__all__ = [
    "DATASETS",
    "FORMATS",
    "IDX_SOURCES",
    "MEAN_STD",
    "SOURCE_RECORD",
    "SPECS",
    "Cifar10Images",
    "DatasetError",
    "DatasetSpec",
    "IdxImages",
    "IdxSource",
    "OfflineImages",
    "PreparationInterrupted",
    "SourceFormat",
    "apt_get_install",
    "batches",
    "channel_stats",
    "check_crop_padding",
    "default_data_dir",
    "ensure_idx_files",
    "load",
    "normalize",
    "pad_images",
    "pipeline_throughput",
    "prepare",
    "provenance",
    "random_crop",
    "random_flip",
    "read_cifar10",
    "read_idx",
    "read_idx_split",
    "spec",
]
