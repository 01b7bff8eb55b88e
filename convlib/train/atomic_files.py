"""Files written whole or not at all: write to a temporary name in the same folder, then ``os.replace``."""

import contextlib
import json
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


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Writes one JSON object per line atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file; ``[]`` if it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
