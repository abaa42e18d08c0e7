"""One sweep per output folder at a time: an advisory lock on ``FOLDER/.sweep.lock``.

Two sweeps appending to the same results file would each run every cell and
write every row twice (both see the same unfinished cells). The lock makes the
second one stop at once with a message naming the process that holds it.

The lock is ``flock`` on a file that records the holder's pid. The kernel
drops an ``flock`` when its process dies, however it dies, so a lock file left
by a killed sweep is taken over without any pid guessing (and a reused pid
cannot keep a folder locked). Where ``fcntl`` does not exist (Windows) the
file is created exclusively instead, and a file naming a process that is no
longer running is taken over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitsweep.errors import BitsweepError
from bitsweep.io import pid_alive

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".sweep.lock"


def _holder(path: Path) -> str:
    """The pid recorded in a lock file, as text for the message ("unknown" while it is being written)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _busy(folder: Path, path: Path) -> BitsweepError:
    return BitsweepError(
        f"'{folder}' is in use by another sweep (pid {_holder(path)}); wait for it or choose another --output"
    )


def _acquire_flock(folder: Path, path: Path) -> int:
    """Lock ``path`` with flock; returns the open descriptor. Retries when the file was replaced meanwhile."""
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, path) from None
        # The previous holder unlinks the file just before it unlocks; if that happened between our
        # open and our flock, we hold a lock on a file nobody else will open: start again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        os.close(fd)


def _acquire_exclusive(folder: Path, path: Path) -> int:
    """Fallback without flock: create the file exclusively; take it over when its pid is not running."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder == "unknown" or pid_alive(int(holder)):
                raise _busy(folder, path) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        return fd


@contextmanager
def sweep_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the sweep lock of ``folder`` (created if missing) for the ``with`` block.

    Yields:
        The lock file's path.

    Raises:
        BitsweepError: when another running sweep holds the folder.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = _acquire_flock(root, path) if fcntl is not None else _acquire_exclusive(root, path)
    try:
        yield path
    finally:
        # Unlink while still holding the lock, so no one can lock the old file after we let go.
        path.unlink(missing_ok=True)
        os.close(fd)
