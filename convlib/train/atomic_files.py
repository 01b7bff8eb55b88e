"""Files written whole or not at all: write to a temporary name in the same folder, then ``os.replace``."""

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator


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
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file; ``[]`` if it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
