"""Files written whole or not at all: write to a temporary name in the same folder, then ``os.replace``."""

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator


class DiskFullError(OSError):
    """No space was left while writing ``filename``; the message names the file system (its mount point), the bytes
    free there and, where known, about how many were needed."""

    def __init__(self, filename: str | os.PathLike, needed: int | None = None):
        filename = os.fspath(filename)
        mount = _mount_point(filename)
        free = shutil.disk_usage(mount).free
        wanted = "" if needed is None else f", about {needed:,} needed"
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        self.message = (
            f"no space left on the file system mounted at {mount} while writing {filename} "
            f"({free:,} bytes free{wanted}): free some space there, or write elsewhere"
        )

    def __str__(self) -> str:
        return self.message


def as_disk_full(error: BaseException, filename=None, needed: int | None = None) -> DiskFullError | None:
    """The :class:`DiskFullError` behind ``error`` (it, its cause or its context: libraries wrap the ``OSError``
    of a full disk), naming ``filename`` where the error names none; None when the disk was not full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return error
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return DiskFullError(error.filename or filename or ".", needed)
        error = error.__cause__ or error.__context__
    return None


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) or not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path next to ``path``; when the block succeeds it replaces ``path``, else it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (:class:`DiskFullError` when the disk is full; ``path`` is then as
    it was)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        full = as_disk_full(error, path, len(text.encode()))
        if full is None or full is error:
            raise
        raise full from error


def strict_json(obj, **dumps_options) -> str:
    """``obj`` as strict JSON (RFC 8259): NaN and infinities, which JSON cannot hold, become ``null``.

    >>> strict_json({"loss": float("nan"), "steps": [1, 2]})
    '{"loss": null, "steps": [1, 2]}'
    """
    return json.dumps(_finite(obj), allow_nan=False, **dumps_options)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented strict JSON atomically (see :func:`strict_json`)."""
    write_text(path, strict_json(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Writes one strict JSON object per line atomically."""
    write_text(path, "".join(strict_json(r) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike, *, damaged: str = "raise") -> list[dict]:
    """The records of a JSON-lines file; ``[]`` if it does not exist. A damaged line raises ``ValueError`` naming
    the file and the line (``damaged="drop"``: warns and returns the records before it)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                problem = f"{os.fspath(path)} line {number} is damaged ({error})"
                if damaged != "drop":
                    raise ValueError(problem) from None
                warnings.warn(f"{problem}: it and the lines after it are dropped", stacklevel=2)
                break
            records.append(record)
    return records
