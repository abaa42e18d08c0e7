"""Atomic writes: complete or absent, and no temp file left behind by a failed or killed write."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bitsweep.io import atomic_path, clean_stale_temps, write_text_atomic


def _dead_pid() -> int:
    """A process id no process has: above the kernel's largest pid."""
    pid_max = Path("/proc/sys/kernel/pid_max")
    return int(pid_max.read_text()) + 1 if pid_max.exists() else 2**22 + 1


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob(".*.tmp"))


def test_exception_removes_the_temp_file_and_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_temp_of_a_dead_writer_is_removed_on_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    dead = _dead_pid()  # like a writer killed mid-write
    stale = tmp_path / f".last.pt.{dead}.abc123.tmp"
    stale.write_bytes(b"")
    legacy_old = tmp_path / ".last.pt.zz9x_k1q.tmp"  # naming before pids were recorded
    legacy_old.write_bytes(b"")
    old = time.time() - 3600
    os.utime(legacy_old, (old, old))
    live = tmp_path / f".last.pt.{os.getpid()}.live01.tmp"  # a concurrent writer still running
    live.write_bytes(b"x")
    legacy_new = tmp_path / ".last.pt.fresh_01.tmp"
    legacy_new.write_bytes(b"x")
    other = tmp_path / f".last.pt.json.{dead}.abc123.tmp"  # another target's temp file
    other.write_bytes(b"")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert not stale.exists() and not legacy_old.exists()
    assert live.exists() and legacy_new.exists() and other.exists()


def test_clean_stale_temps_reports_what_it_removed(tmp_path: Path) -> None:
    target = tmp_path / "best.pt"
    tmp = tmp_path / f".best.pt.{_dead_pid()}.aaaa.tmp"
    tmp.write_bytes(b"")
    assert clean_stale_temps(target) == [tmp]
    assert clean_stale_temps(target) == []
