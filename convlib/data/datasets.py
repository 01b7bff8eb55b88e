"""TFDS datasets from local files, prepared and read without TensorFlow or a network.

Every dataset of the registry (``convlib.data.registry.SPECS``) is prepared by the TFDS builder of its source
format (``FORMATS``). The builders (``tfds.core.GeneratorBasedBuilder``) write ``array_record`` files with
``Tensor`` features (no ``Image`` feature: encoding it needs TensorFlow):

- ``IdxImages`` (one config per ``"idx"`` dataset: ``fashion_mnist``, ``mnist``): the four MNIST-format IDX files;
  prepared into ``<data_dir>/convlib_idx/<name>/<VERSION>/``.
- ``Cifar10Images``: the official ``cifar-10-python.tar.gz`` or its extracted folder (``convlib.data.cifar``);
  prepared into ``<data_dir>/convlib_cifar10/<VERSION>/``.

``load`` is the entry point for training code: find the source files, prepare once, read back through the TFDS
data source. A prepared dataset records its source (``provenance``); a different source is refused, a damaged
prepared file is named with the command that rebuilds it, and an interrupted preparation is removed by the next.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from convlib.data import cifar, idx
from convlib.data.registry import SPECS, DatasetSpec, spec
from convlib.data.sources import ensure_idx_files

SOURCE_RECORD = "convlib_source.json"
"""The file, in a prepared dataset's folder, that records its source (see :func:`provenance`)."""

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # {"train": (images (N, H, W, C) uint8, labels (N,)), "test": ...}


class DatasetError(ValueError):
    """A dataset that cannot be prepared or read, in one line naming the path and what to do: a damaged prepared
    dataset, a source other than the one it was prepared from, a ``data_dir`` that is a file or cannot be
    written, a full disk."""


class PreparationInterrupted(KeyboardInterrupt):
    """Ctrl-C while a dataset was being prepared; the message says that nothing was prepared."""


class OfflineImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """uint8 images with class labels from the local source files of one registry dataset (:attr:`spec`).

    Every source file is read and checked before anything is written; the images are stored as raw bytes (not the
    default int64 list: preparing is ~3x faster), in the source files' order (no shuffling). With the shards, the
    prepared folder gets :data:`SOURCE_RECORD`: the source's files with their sha256, and the shards' sizes and
    sha256.
    """

    def __init__(self, *, source: os.PathLike | str | None = None, **kwargs):
        """``source``: the folder or archive to read (default: TFDS's ``manual_dir``)."""
        self._source = source
        self._bytes_needed: int | None = None
        super().__init__(file_format="array_record", **kwargs)

    @property
    def spec(self) -> DatasetSpec:
        """The registry entry this builder prepares."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        shape = self.spec.image_shape
        features = {
            "image": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=list(self.spec.class_names)),
        }
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label"), disable_shuffling=True
        )

    def _source_path(self, dl_manager: tfds.download.DownloadManager) -> Path:
        return Path(self._source if self._source is not None else dl_manager.manual_dir)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = FORMATS[self.spec.format].read(self._source_path(dl_manager), self.spec)
        self._bytes_needed = sum(images.nbytes + labels.nbytes for images, labels in splits.values())
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}

    def _download_and_prepare(self, dl_manager, download_config):
        # TFDS points data_path at its incomplete.* folder meanwhile: the record is renamed into place with the data.
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        source = self._source_path(dl_manager).resolve()
        folder = Path(self.data_path)
        record = {
            "dataset": self.spec.name,
            "source": str(source),
            "files": _hashes(FORMATS[self.spec.format].files(source), source),
            "prepared": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _shards(folder)},
        }
        (folder / SOURCE_RECORD).write_text(json.dumps(record, indent=1))


class IdxImages(OfflineImages):
    """Grayscale image classification from the four standard IDX files in ``manual_dir``; one config per
    ``"idx"`` dataset of the registry."""

    name = "convlib_idx"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "Images stored as raw bytes (Tensor BYTES encoding).",
    }
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name=s.name, description=s.description) for s in SPECS.values() if s.format == "idx"
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the four IDX files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzip or not) in manual_dir."
    )

    @property
    def spec(self) -> DatasetSpec:
        """The registry entry of this builder's config."""
        return SPECS[self.builder_config.name]


class Cifar10Images(OfflineImages):
    """CIFAR-10 (Krizhevsky 2009), 50k train / 10k test, from the official python archive in ``manual_dir``."""

    name = "convlib_cifar10"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {cifar.URL} and put it (or its extracted folder {cifar.FOLDER}/) in manual_dir."
    )

    @property
    def spec(self) -> DatasetSpec:
        """The registry entry ``cifar10``."""
        return SPECS["cifar10"]


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """How the source of one kind of dataset is found, read and recorded, and which builder prepares it.

    Attributes:
      locate: ``(spec, source_dir or None, data_dir, apt_install, download) -> source`` (a folder or an archive);
        raises ``FileNotFoundError`` saying what to install or put where.
      read: ``(source, spec) -> {"train": (images uint8 (N, H, W, C), labels (N,)), "test": ...}``, every file
        checked against ``spec`` (errors name the file).
      files: ``source -> the files read`` (their sha256 is the prepared dataset's provenance).
      builder: the TFDS builder class (with ``BUILDER_CONFIGS``: one config per dataset of this format).
    """

    locate: Callable[[DatasetSpec, Path | None, Path, Any, bool], Path]
    read: Callable[[Path, DatasetSpec], Splits]
    files: Callable[[Path], list[Path]]
    builder: type[OfflineImages]


def _locate_idx(dataset: DatasetSpec, source_dir, data_dir: Path, apt_install, download: bool) -> Path:
    download_dir = data_dir / "downloads" if download else None
    return ensure_idx_files(dataset.name, source_dir, apt_install=apt_install, download_dir=download_dir)


def _locate_cifar10(dataset: DatasetSpec, source_dir, data_dir: Path, apt_install, download: bool) -> Path:
    # Never downloaded; looked for before TFDS starts, whose error would not say where to put the file.
    return cifar.find_source(data_dir / "downloads" / "manual" if source_dir is None else source_dir)


FORMATS: dict[str, SourceFormat] = {
    "idx": SourceFormat(
        locate=_locate_idx,
        read=lambda folder, dataset: idx.read_idx_dataset(folder, dataset.image_shape, dataset.num_classes),
        files=idx.idx_files,
        builder=IdxImages,
    ),
    "cifar10_python": SourceFormat(
        locate=_locate_cifar10,
        read=lambda source, dataset: cifar.read_cifar10(source),
        files=cifar.source_files,
        builder=Cifar10Images,
    ),
}
"""Each source format of the registry (``DatasetSpec.format``): its reader and TFDS builder."""


def default_data_dir() -> Path:
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``, read at call time."""
    return Path(tfds.core.constants.get_default_data_dir()).expanduser()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hashes(files: list[Path], source: Path) -> dict[str, str]:
    """``{path relative to source (an archive: its name): sha256}``."""
    return {(f.relative_to(source) if f != source else Path(f.name)).as_posix(): _sha256(f) for f in files}


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.array_record-*"))


def _prepared_path(dataset: DatasetSpec, data_dir: Path) -> Path:
    """Where TFDS puts the prepared dataset (``builder.data_path``), known without building the builder."""
    builder = FORMATS[dataset.format].builder
    return data_dir.joinpath(builder.name, *([dataset.name] if builder.BUILDER_CONFIGS else []), str(builder.VERSION))


def _damaged(dataset: DatasetSpec, folder: Path, reason: str) -> DatasetError:
    """The one line for a damaged prepared dataset: what is wrong, and the command that rebuilds it."""
    reason = " ".join(reason.split())
    return DatasetError(
        f"prepared dataset {dataset.name} in {folder} is damaged ({reason}); rebuild it with "
        f"`rm -r {shlex.quote(str(folder))}` and load it again (it is prepared from its source)"
    )


def _read_record(dataset: DatasetSpec, folder: Path) -> dict | None:
    path = folder / SOURCE_RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _damaged(dataset, folder, f"{path}: {error}") from None


def _builder(dataset: DatasetSpec, data_dir: Path, source: Path | None = None) -> OfflineImages:
    cls = FORMATS[dataset.format].builder
    config = {"config": dataset.name} if cls.BUILDER_CONFIGS else {}
    try:  # TFDS reads a prepared dataset's info files here
        return cls(data_dir=data_dir, source=source, **config)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise _damaged(dataset, _prepared_path(dataset, data_dir), str(error)) from None


def _check_data_dir(data_dir: Path) -> Path:
    """The first existing folder at or above ``data_dir``; a file there is refused."""
    existing = data_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DatasetError(f"data_dir={str(data_dir)!r} (--data-dir): {existing} is a file, not a folder")
    return existing


def _check_writable(data_dir: Path, dataset: DatasetSpec) -> None:
    existing = _check_data_dir(data_dir)
    try:  # the honest test (permission bits say little to root): make a folder there, and remove it
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".convlib-probe-"))
    except OSError as error:
        raise DatasetError(
            f"data_dir={str(data_dir)!r} (--data-dir) cannot be written ({existing}: {error.strerror}), and "
            f"{dataset.name} is not prepared there: pass a writable data dir"
        ) from None


def _check_same_source(dataset: DatasetSpec, folder: Path, source_dir, source: Path) -> None:
    """Refuses ``source`` (found in the caller's ``source_dir``) unless it holds the files the prepared dataset was
    made from."""
    record = _read_record(dataset, folder)
    files = _hashes(FORMATS[dataset.format].files(source), source)
    if record is not None and record["files"] == files:
        return
    made_from = "without a record of its source" if record is None else f"from other files ({record['source']})"
    raise DatasetError(
        f"source_dir={str(source_dir)!r} (--source-dir): {dataset.name} in {folder} was prepared {made_from}; to "
        f"prepare it from source_dir, remove that folder (`rm -r {shlex.quote(str(folder))}`) or pass another data_dir"
    )


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path):
        path = path.parent
    return path


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` says a write found no space: an ``OSError``, or the ``RuntimeError`` of array_record's
    writer, which names the system's reason but carries no errno."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return True
    return isinstance(error, RuntimeError) and any(os.strerror(e) in str(error) for e in _DISK_FULL)


def _prepare_once(dataset: DatasetSpec, data_dir: Path, source_dir, apt_install, download: bool) -> OfflineImages:
    """Prepares ``dataset`` unless another process did meanwhile, holding its preparation lock (one preparer at a
    time; the kernel releases it when a process dies) after removing what interrupted preparations left; the
    failures a user can fix end in one line."""
    folder = _prepared_path(dataset, data_dir)
    _check_writable(data_dir, dataset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / "convlib-prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in folder.parent.glob(f"incomplete.*_{folder.name}"):  # TFDS's temporary folders
            shutil.rmtree(leftover)
        if folder.exists():
            return _builder(dataset, data_dir)
        builder = None
        try:
            source = FORMATS[dataset.format].locate(dataset, source_dir, data_dir, apt_install, download)
            builder = _builder(dataset, data_dir, source)
            builder.download_and_prepare()
            return builder
        except KeyboardInterrupt:
            raise PreparationInterrupted(
                f"preparing {dataset.name} in {data_dir} was interrupted: nothing was prepared (the next run "
                "prepares it again)"
            ) from None
        except (OSError, RuntimeError) as error:
            if not _disk_full(error):
                raise
            needed = getattr(builder, "_bytes_needed", None)
            mount = _mount_point(_check_data_dir(data_dir))
            raise DatasetError(
                f"no space to prepare {dataset.name} in {data_dir} ({' '.join(str(error).split(';')[0].split())}): "
                f"the file system at {mount} has {shutil.disk_usage(mount).free} bytes free"
                + ("" if needed is None else f", about {needed} bytes are needed")
            ) from None


def prepare(
    name: str = "fashion_mnist",
    *,
    data_dir: os.PathLike | str | None = None,
    source_dir: os.PathLike | str | None = None,
    apt_install: Callable[[str], bool] | None = None,
    download: bool = True,
) -> OfflineImages:
    """Prepares dataset ``name`` (one of ``DATASETS``) under ``data_dir`` once; returns the builder.

    Already prepared: nothing is written; a ``source_dir`` given must hold the files it was prepared from
    (``DatasetError`` otherwise: a prepared dataset is never silently replaced). Otherwise the source is found
    (``SourceFormat.locate``: for ``cifar10`` the archive or folder in ``source_dir``, default
    ``<data_dir>/downloads/manual``, never downloaded; for the IDX datasets ``ensure_idx_files``: ``source_dir``,
    the Debian package's folder, ``apt_install`` when given, download), read, checked and written. TFDS writes into
    an ``incomplete.*`` folder and renames it when done, so a failure leaves no prepared dataset behind; the next
    preparation removes such folders. See :func:`load` for the arguments.
    """
    dataset = spec(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    _check_data_dir(data_dir)
    if _prepared_path(dataset, data_dir).exists():  # the test download_and_prepare itself uses
        builder = _builder(dataset, data_dir)
    else:
        builder = _prepare_once(dataset, data_dir, source_dir, apt_install, download)
    if source_dir is not None:  # a dataset prepared before (or by another process meanwhile) from other files
        source = FORMATS[dataset.format].locate(dataset, source_dir, data_dir, None, False)
        _check_same_source(dataset, Path(builder.data_path), source_dir, source)
    return builder


def _read_split(builder: OfflineImages, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split, or ``DatasetError`` naming the damaged prepared file (by the sizes and hashes recorded
    when it was prepared) and the command that rebuilds it."""
    dataset, folder = builder.spec, Path(builder.data_path)
    shards = (_read_record(dataset, folder) or {}).get("prepared", {})

    for file, recorded in shards.items():
        size = (folder / file).stat().st_size if (folder / file).is_file() else None
        if size != recorded["bytes"]:
            found = "missing" if size is None else f"{size} bytes, prepared with {recorded['bytes']}"
            raise _damaged(dataset, folder, f"{folder / file}: {found}")
    try:
        source = builder.as_data_source(split=split)
        examples = source.__getitems__(list(range(len(source))))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        changed = [file for file, recorded in shards.items() if _sha256(folder / file) != recorded["sha256"]]
        reason = f"{folder / changed[0]} changed since it was prepared" if changed else str(error)
        raise _damaged(dataset, folder, reason) from None
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples], dtype=np.int32)
    return images, labels


def load(
    name: str = "fashion_mnist",
    split: str = "train",
    *,
    data_dir: os.PathLike | str | None = None,
    source_dir: os.PathLike | str | None = None,
    apt_install: Callable[[str], bool] | None = None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split as NumPy arrays, preparing the TFDS dataset first if needed (see :func:`prepare`).

    Args:
      name: one of ``DATASETS``: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
      split: ``"train"`` or ``"test"``.
      data_dir: TFDS data dir; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      source_dir: IDX datasets: folder with the four IDX files (default: see ``ensure_idx_files``); ``cifar10``:
        ``cifar-10-python.tar.gz``, its extracted folder, or a folder holding either (default
        ``<data_dir>/downloads/manual``). With the dataset already prepared, it must hold the same files.
      apt_install: opt-in installer of a Debian package, e.g. ``data.apt_get_install`` (default ``None``: never
        install; a missing dataset names the command that installs it); IDX datasets only.
      download: allow downloading the IDX files through TFDS's download manager (CIFAR-10 is never downloaded).

    Returns:
      images uint8 (N, H, W, C) (``spec(name).image_shape``: (28, 28, 1) IDX, (32, 32, 3) CIFAR-10), labels int32
      (N,), in the source files' order.

    Raises:
      ValueError: an unknown ``name`` or ``split``; a source file that is corrupt (naming it).
      FileNotFoundError: no source found; the message names the command that installs it or where to put it.
      DatasetError: see :class:`DatasetError`.
      PreparationInterrupted: Ctrl-C while preparing.
    """
    if split not in idx.SPLIT_FILES:  # CIFAR-10 has the same two splits
        raise ValueError(f"split={split!r}: expected one of {sorted(idx.SPLIT_FILES)}")
    builder = prepare(name, data_dir=data_dir, source_dir=source_dir, apt_install=apt_install, download=download)
    return _read_split(builder, split)


def provenance(name: str = "fashion_mnist", data_dir: os.PathLike | str | None = None) -> dict | None:
    """The recorded source of dataset ``name`` prepared under ``data_dir``: what a run really trained on.

    Returns:
      ``{"dataset": name, "source": the folder or archive it was prepared from, "files": {file: sha256},
      "prepared": {shard: {"bytes", "sha256"}}}``; ``None`` when it is not prepared there, or was prepared
      without a record (by an older convlib).
    """
    dataset = spec(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    return _read_record(dataset, _prepared_path(dataset, data_dir))
