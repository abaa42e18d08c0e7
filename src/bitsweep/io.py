"""Atomic file writes: an output file is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(target: Path, min_age_s: float = 600.0) -> list[Path]:
    """Remove temporary files an earlier, killed write of ``target`` left behind; returns what was removed.

    A temp file is ``.<name>.<pid>.<random>.tmp``: it is stale when its writer process is gone. A temp
    file of unknown origin (older naming) is stale once it is ``min_age_s`` old, so a concurrent
    writer's file is never taken from under it.
    """
    removed = []
    now = time.time()
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        parts = tmp.name[len(target.name) + 2 : -len(".tmp")].split(".")
        if len(parts) > 2 or (len(parts) == 2 and not parts[0].isdigit()):
            continue  # a temp file of another target whose name starts with this one's
        try:
            if not pid_alive(int(parts[0])) if len(parts) == 2 else now - tmp.stat().st_mtime > min_age_s:
                tmp.unlink()
                removed.append(tmp)
        except (FileNotFoundError, PermissionError):  # another writer cleaned it, or not ours to remove
            continue
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The temporary file lives in the same directory so the final ``os.replace``
    is atomic on POSIX file systems. If the body raises, the temporary file is
    removed and ``path`` keeps its previous content or stays absent. A process
    killed mid-write cannot clean up, so each write first removes the temporary
    files that dead writers of the same target left (see :func:`clean_stale_temps`).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "x.txt").read_text()
    'hello'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file with mode 0600; give the result the permissions
    # an ordinary open() would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    """Append one JSON row and flush it to disk, so an interrupted run keeps every finished row."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
