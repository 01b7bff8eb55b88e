"""Reading MNIST-format IDX files (gzip-compressed or not) into NumPy arrays.

The IDX format: a big-endian header ``0x00 0x00 <type> <ndim>`` (type ``0x08`` is
unsigned byte), then ``ndim`` big-endian uint32 dimensions, then the data.
Images files have magic ``0x00000803`` (N, H, W); label files ``0x00000801`` (N,).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# File stems of the four standard files, per split.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(folder: os.PathLike | str, stem: str) -> Path:
    """Returns ``folder/stem.gz`` or ``folder/stem``, whichever exists (gz first).

    Raises:
      FileNotFoundError: naming both candidate paths when neither exists.
    """
    folder = Path(folder)
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"IDX file {folder / stem}[.gz] not found: expected {stem}.gz or {stem} in {folder}")


def missing_idx_files(folder: os.PathLike | str) -> list[str]:
    """Returns the stems of the four standard IDX files that ``folder`` lacks."""
    missing = []
    for stems in SPLIT_FILES.values():
        for stem in stems:
            try:
                find_idx_file(folder, stem)
            except FileNotFoundError:
                missing.append(stem)
    return missing


def idx_files(folder: os.PathLike | str) -> list[Path]:
    """The four standard IDX files in ``folder`` (see :func:`find_idx_file`), train then test, images first."""
    return [find_idx_file(folder, stem) for stems in SPLIT_FILES.values() for stem in stems]


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"IDX file {path} not found") from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"IDX file {path} is not a valid gzip stream (truncated or corrupt): {e}") from e


def read_idx(path: os.PathLike | str, magic: int) -> np.ndarray:
    """Reads one IDX file of unsigned bytes whose header magic must equal ``magic``.

    Returns:
      uint8 array of the shape the header declares, e.g. (N, H, W) for images.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: naming the file, for a corrupt gzip stream, a wrong magic number, or a
        data length that disagrees with the header dimensions.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, too short for a header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"IDX file {path} has magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, header needs {header_len}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header_len + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {path} has {len(raw)} bytes, expected {expected} for shape {shape} "
            f"({'truncated' if len(raw) < expected else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def read_idx_split(folder: os.PathLike | str, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split's images and labels from the standard files in ``folder``.

    Args:
      folder: holds ``train-images-idx3-ubyte[.gz]`` etc.
      split: ``"train"`` or ``"test"`` (``t10k-*`` files).
      num_classes: labels must lie in ``[0, num_classes)``.

    Returns:
      images uint8 (N, H, W), labels uint8 (N,).

    Raises:
      ValueError: bad ``split``; or, naming the files, a corrupt file, an image/label count
        mismatch, or a label out of range.
      FileNotFoundError: a file is missing.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r}: expected one of {sorted(SPLIT_FILES)}")
    images_stem, labels_stem = SPLIT_FILES[split]
    images_path = find_idx_file(folder, images_stem)
    labels_path = find_idx_file(folder, labels_stem)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(
            f"IDX files disagree on the number of examples: {images_path} has {len(images)} "
            f"images, {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"IDX file {labels_path} has label {int(labels.max())}, expected labels in [0, {num_classes})")
    return images, labels


def read_idx_dataset(
    folder: os.PathLike | str, image_shape: tuple[int, int, int], num_classes: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads and checks both splits of the four standard files in ``folder``.

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}``: images uint8 (N, H, W, 1), labels uint8 (N,).

    Raises:
      ValueError, FileNotFoundError: as :func:`read_idx_split`, or naming the file whose images are not
        ``image_shape[:2]``.
    """
    splits = {}
    for split, (images_stem, _) in SPLIT_FILES.items():
        images, labels = read_idx_split(folder, split, num_classes)
        if images.shape[1:] != tuple(image_shape[:2]):
            raise ValueError(
                f"IDX file {find_idx_file(folder, images_stem)} has images of shape {images.shape[1:]}, "
                f"expected {tuple(image_shape[:2])}"
            )
        splits[split] = (images[..., None], labels)
    return splits
