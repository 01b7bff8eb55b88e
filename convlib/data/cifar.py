"""Reading CIFAR-10 as researchers hold it: the official ``cifar-10-python.tar.gz`` or its extracted folder.

The archive (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) holds ``cifar-10-batches-py/`` with the
pickled batches ``data_batch_1`` ... ``data_batch_5`` (training, 10,000 images each), ``test_batch`` (10,000) and
``batches.meta``. Each batch is a dict with ``b"data"``, uint8 (N, 3072) (per row the red, green then blue 32x32
plane, row-major), and ``b"labels"``, N ints in [0, 10).

Pickles can run code when loaded: only files from the archive or the folder are unpickled, and only with an
unpickler that knows no globals but the two NumPy needs to rebuild an array.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
META = "batches.meta"
NAMES = (META, *(n for files in SPLIT_FILES.values() for n in files))  # the folder's files
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
ROW = 32 * 32 * 3

_RECONSTRUCT, _ = np.zeros(1).__reduce__()[:2]  # numpy's array-rebuilding function, whatever its module
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # pickles made with NumPy 1 (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # and with NumPy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Python 2 pickles of dicts, lists, bytes, ints and NumPy arrays; any other global is refused."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch") from None


def find_source(source_dir: os.PathLike | str) -> Path:
    """The CIFAR-10 files under ``source_dir``: the archive or the extracted folder.

    ``source_dir`` may be the archive itself, the extracted ``cifar-10-batches-py`` folder, or a folder holding
    either (the archive is preferred).

    Raises:
      FileNotFoundError: naming where it looked and where to put the archive.
    """
    source_dir = Path(source_dir)
    if source_dir.is_file() or (source_dir.name == FOLDER and source_dir.is_dir()):
        return source_dir
    for candidate in (source_dir / ARCHIVE, source_dir / FOLDER):
        if candidate.exists():
            return candidate
    if (source_dir / SPLIT_FILES["test"][0]).is_file():
        return source_dir
    raise FileNotFoundError(
        f"CIFAR-10 not found: expected {source_dir / ARCHIVE} or the extracted folder {source_dir / FOLDER}/. "
        f"Download {URL} (163 MB) and put it in {source_dir}, or pass source_dir=DIR (--source-dir DIR) "
        f"for a folder that holds it"
    )


def source_files(source: os.PathLike | str) -> list[Path]:
    """The files :func:`read_cifar10` reads from ``source`` (what :func:`find_source` returns): the archive, or the
    batch files of the folder.

    Raises:
      FileNotFoundError: naming the folder and the batch files it lacks.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if missing := sorted(n for n in NAMES if not (source / n).is_file()):
        raise FileNotFoundError(f"CIFAR-10 folder {source} lacks {missing}")
    return [source / n for n in NAMES]


def _read_members(archive: Path, names: set[str]) -> dict[str, bytes]:
    """The files ``names`` (base names) of the ``cifar-10-batches-py/`` folder in the archive, in one pass."""
    found = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.isfile() and path.parent.name == FOLDER and path.name in names:
                    found[path.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(
            f"CIFAR-10 archive {archive} is not a complete gzip-compressed tar file (truncated or wrong format; "
            f"expected the official {ARCHIVE}): {e}"
        ) from e
    if missing := sorted(names - found.keys()):
        raise FileNotFoundError(f"CIFAR-10 archive {archive} lacks {[f'{FOLDER}/{m}' for m in missing]}")
    return found


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"CIFAR-10 file {where} is not a pickled CIFAR-10 batch: {e}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 file {where} holds a {type(batch).__name__}, expected a dict")
    return batch


def _check_batch(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch dict -> images uint8 (N, 32, 32, 3), labels uint8 (N,)."""
    if missing := [k for k in (b"data", b"labels") if k not in batch]:
        raise ValueError(f"CIFAR-10 file {where} lacks the keys {missing}, expected b'data' and b'labels'")
    images, labels = batch[b"data"], batch[b"labels"]
    is_array = isinstance(images, np.ndarray)
    if not (is_array and images.dtype == np.uint8 and images.ndim == 2 and images.shape[1] == ROW):
        found = f"{images.dtype} {images.shape}" if is_array else type(images).__name__
        raise ValueError(f"CIFAR-10 file {where} has b'data' of {found}, expected a uint8 array (N, {ROW})")
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise ValueError(f"CIFAR-10 file {where} has b'labels' of {type(labels).__name__}, expected a list of ints")
    if len(labels) != len(images):
        raise ValueError(f"CIFAR-10 file {where} has {len(images)} images but {len(labels)} labels")
    if labels and not 0 <= min(labels) <= max(labels) < len(CLASSES):
        raise ValueError(f"CIFAR-10 file {where} has labels outside [0, {len(CLASSES)})")
    # Each row: the red, green and blue planes, each 32x32 row-major -> (N, 32, 32, 3).
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, np.uint8)


def _check_meta(meta: dict, where: str) -> None:
    names = meta.get(b"label_names")
    if names != [c.encode() for c in CLASSES]:
        raise ValueError(f"CIFAR-10 file {where} has b'label_names' {names!r}, expected the ten classes {CLASSES}")


def read_cifar10(source_dir: os.PathLike | str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads and checks every CIFAR-10 batch under ``source_dir`` (see ``find_source``).

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}``: images uint8 (N, 32, 32, 3) NHWC, labels uint8
      (N,), in the batches' order (train: data_batch_1 to 5 concatenated).

    Raises:
      FileNotFoundError: no archive or folder, or a batch file missing; naming the file.
      ValueError: naming the file, for a truncated or wrong-format archive or pickle, or a batch with wrong keys,
        shapes, dtypes or labels.
    """
    source = find_source(source_dir)
    if source.is_file():
        raw = _read_members(source, set(NAMES))
        where = {n: f"{FOLDER}/{n} in {source}" for n in NAMES}
    else:
        raw = {path.name: path.read_bytes() for path in source_files(source)}
        where = {n: str(source / n) for n in NAMES}
    _check_meta(_unpickle(raw[META], where[META]), where[META])
    splits = {}
    for split, files in SPLIT_FILES.items():
        parts = [_check_batch(_unpickle(raw[n], where[n]), where[n]) for n in files]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return splits
