"""Datasets through TFDS (offline builders: IDX files, the CIFAR-10 python archive) and the device-side pipeline.

Typical use::

    images, labels = convlib.data.load("fashion_mnist", "train")   # uint8 (N,28,28,1), int32 (N,)
    images = convlib.data.pad_images(jax.device_put(images), to=32)
    crop = functools.partial(convlib.data.random_crop, padding=4)   # built once, reused
    for batch in convlib.data.batches(epoch_key, images, labels, 128, transform=crop):
        ...  # batch["image"]: (128, 32, 32, 1) uint8, batch["label"]: (128,) int32
"""

from convlib.data.augment import (
    MEAN_STD,
    channel_stats,
    check_crop_padding,
    normalize,
    pad_images,
    random_crop,
    random_flip,
)
from convlib.data.cifar import read_cifar10
from convlib.data.datasets import DATASETS, Cifar10Images, IdxImages, default_data_dir, load, prepare
from convlib.data.idx import read_idx, read_idx_split
from convlib.data.pipeline import batches, pipeline_throughput
from convlib.data.sources import IDX_SOURCES, IdxSource, apt_get_install, ensure_idx_files

__all__ = [
    "DATASETS",
    "IDX_SOURCES",
    "MEAN_STD",
    "Cifar10Images",
    "IdxImages",
    "IdxSource",
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
    "random_crop",
    "random_flip",
    "read_cifar10",
    "read_idx",
    "read_idx_split",
]
