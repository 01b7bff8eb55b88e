"""One writer per folder: an exclusive ``fcntl.flock`` on a lock file in it, held for a run's life.

The kernel releases the lock when its holder dies (``kill -9`` included), so a lock file left by a killed run never
blocks the next one. The file holds the holder's PID, so that a refused writer can name it.
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator

LOCK_FILE = ".convlib.lock"
_held: dict[str, int] = {}  # folder (real path) -> nesting depth, of the locks this process holds


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock. ``folder``: the folder; ``holder``: its PID (None if unknown)."""

    def __init__(self, folder: str, holder: int | None, what: str):
        self.folder, self.holder = folder, holder
        by = "another process" if holder is None else f"process {holder}"
        super().__init__(f"{what} {folder!r} is in use by {by} (another run writes there): wait for it to end")


def _holder(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str = "folder") -> Iterator[None]:
    """Holds the lock of ``folder`` (created if missing) for the block, or raises :class:`FolderInUseError` at
    once when another process holds it; ``what`` names the folder in that message (e.g. ``"--out"``). A process
    already holding it holds it again (one writer, e.g. checkpoints kept in the output folder itself). On leaving,
    the lock file goes, and so does the folder when this call created it and nothing else was written there.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with exclusive(folder):
    ...     with open(os.path.join(folder, LOCK_FILE)) as f:
    ...         int(f.read()) == os.getpid()
    True
    """
    folder = os.fspath(folder)
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUseError(folder, holder, what) from None
        # a holder that finished removed the file after we opened it: lock the file that is there now
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _held[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        del _held[key]
        os.remove(path)  # while still held: a waiting opener of this file sees it gone and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                os.rmdir(folder)
