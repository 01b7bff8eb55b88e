"""Finding the four IDX files of a dataset: local folder, Debian package, or download.

``ensure_idx_files`` tries, in order: the folder the caller names; the Debian package's
folder (Fashion-MNIST: ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``);
an earlier download; installing the Debian package, only when the caller opts in with
``apt_install=apt_get_install``; downloading through TFDS's ``DownloadManager`` from the
standard URLs. Otherwise it stops with one line naming the command that installs the
dataset and where to put its files.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import tensorflow_datasets as tfds

from convlib.data import idx
from convlib.data.registry import SPECS


@dataclasses.dataclass(frozen=True)
class IdxSource:
    """Where a dataset's IDX files can be found."""

    url: str  # base URL of the four .gz files
    debian_package: str | None = None
    debian_dir: Path | None = None


IDX_SOURCES = {
    s.name: IdxSource(url=s.url, debian_package=s.debian_package, debian_dir=s.debian_dir)
    for s in SPECS.values()
    if s.format == "idx"
}
"""Where :func:`ensure_idx_files` looks for each dataset's IDX files besides `source_dir`."""


def apt_get_install(package: str) -> bool:
    """Installs a Debian package with ``apt-get`` when it is usable (root, Debian).

    Returns whether the install ran and succeeded; ``False`` without apt-get or root.
    """
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode == 0:
        return True
    # The package lists may be missing or stale.
    subprocess.run(["apt-get", "update"], env=env, capture_output=True)
    return subprocess.run(install, env=env, capture_output=True).returncode == 0


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens (TFDS retries for minutes otherwise)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _download(url: str, download_dir: Path, folder: Path) -> None:
    """Downloads the four ``.gz`` files under ``url`` into ``folder`` with their standard names."""
    stems = [stem for pair in idx.SPLIT_FILES.values() for stem in pair]
    manager = tfds.download.DownloadManager(download_dir=download_dir)
    paths = manager.download({stem: urllib.parse.urljoin(url, f"{stem}.gz") for stem in stems})
    folder.mkdir(parents=True, exist_ok=True)
    for stem, path in paths.items():
        # Both live under download_dir: the rename is atomic, no half-written file.
        os.replace(path, folder / f"{stem}.gz")


def ensure_idx_files(
    name: str = "fashion_mnist",
    source_dir: os.PathLike | str | None = None,
    *,
    apt_install: Callable[[str], bool] | None = None,
    download_dir: os.PathLike | str | None = None,
    url: str | None = None,
) -> Path:
    """Returns a folder holding the four IDX files of ``name``, fetching them if needed.

    Args:
      name: a key of ``IDX_SOURCES`` (``"fashion_mnist"``, ``"mnist"``).
      source_dir: use this folder and nothing else.
      apt_install: opt-in: installs a Debian package and returns success, e.g. ``apt_get_install``
        (``None``, the default: never install anything).
      download_dir: where TFDS's download manager stores files (``None``: no download).
        Files already downloaded there are reused.
      url: base URL of the four ``.gz`` files (default: the dataset's standard URL).

    Raises:
      ValueError: unknown ``name``.
      FileNotFoundError: no step found the files; the message says what to do.
    """
    if name not in IDX_SOURCES:
        raise ValueError(f"name={name!r}: expected one of {sorted(IDX_SOURCES)}")
    source = IDX_SOURCES[name]
    if source_dir is not None:
        source_dir = Path(source_dir)
        if missing := idx.missing_idx_files(source_dir):
            raise FileNotFoundError(f"source_dir={str(source_dir)!r} lacks the IDX files {missing} (gzip or not)")
        return source_dir

    downloaded = Path(download_dir) / "convlib_idx" / name if download_dir is not None else None
    candidates = [d for d in (source.debian_dir, downloaded) if d is not None]
    for folder in candidates:
        if not idx.missing_idx_files(folder):
            return folder

    tried = []
    if source.debian_package is not None:
        if apt_install is not None and apt_install(source.debian_package):
            if not idx.missing_idx_files(source.debian_dir):
                return source.debian_dir
        tried.append(f"apt_install ({'not given' if apt_install is None else 'unusable or failed'})")

    url = url or source.url
    if downloaded is not None and _reachable(url):
        _download(url, Path(download_dir), downloaded)
        return downloaded
    tried.append(f"download from {url} ({'disabled' if downloaded is None else 'unreachable'})")

    install = f"install them with `apt-get install {source.debian_package}`, or " if source.debian_package else ""
    raise FileNotFoundError(
        f"No IDX files for {name!r}: looked in {[str(c) for c in candidates]}, tried {'; '.join(tried)}. "
        f"To fix: {install}put the four files "
        f"{[f'{stem}.gz' for pair in idx.SPLIT_FILES.values() for stem in pair]} in a folder DIR "
        f"and pass source_dir=DIR (--source-dir DIR)."
    )
