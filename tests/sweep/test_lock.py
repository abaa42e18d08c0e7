"""One sweep per output folder: a second one stops at once, a dead one's lock is taken over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from bitsweep.errors import BitsweepError
from bitsweep.sweep.grid import expand_grid
from bitsweep.sweep.lock import LOCK_NAME, sweep_lock
from bitsweep.sweep.results import make_header, read_results
from bitsweep.sweep.runner import run_sweep

from sweep_fakes import FakeFactory, logged_ids

HERE = Path(__file__).resolve().parent
GRID = {"weight_bits": [1, 2, 4], "activation_bits": [4, 8]}
HEADER = make_header({"checkpoint_sha256": "abc", "dataset": "synthetic"})


def test_a_held_folder_refuses_a_second_sweep_and_writes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    with sweep_lock(tmp_path / "out") as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(BitsweepError) as err:
            run_sweep(expand_grid(GRID), FakeFactory(log_dir=str(log)), tmp_path / "out" / "results.jsonl", HEADER,
                      progress=False)  # fmt: skip
        with pytest.raises(BitsweepError, match="in use by another sweep"):  # a second lock in one process too
            with sweep_lock(tmp_path / "out"):
                pass
    message = str(err.value)
    assert message == (
        f"'{tmp_path / 'out'}' is in use by another sweep (pid {os.getpid()}); wait for it or choose another --output"
    )
    assert logged_ids(log) == [] and not (tmp_path / "out" / "results.jsonl").exists()
    assert not lock.exists()  # released and removed
    # once released, the folder is free
    out = run_sweep(expand_grid(GRID), FakeFactory(), tmp_path / "out" / "results.jsonl", HEADER, progress=False)
    assert len(out.ran) == len(expand_grid(GRID)) and not lock.exists()


def test_a_lock_file_left_by_a_dead_sweep_is_taken_over(tmp_path: Path) -> None:
    # A killed sweep leaves its lock file; no process holds it any more.
    (tmp_path / LOCK_NAME).write_text("999999999\n")
    out = run_sweep(expand_grid(GRID), FakeFactory(), tmp_path / "results.jsonl", HEADER, progress=False)
    assert len(out.ran) == len(expand_grid(GRID))
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_sweep_fails(tmp_path: Path) -> None:
    cells = expand_grid({"weight_bits": [4], "activation_bits": [8]})
    with pytest.raises(BitsweepError, match="cannot quantize"):
        run_sweep(cells, FakeFactory(fail_label=cells[1].label), tmp_path / "r.jsonl", HEADER, progress=False)
    with sweep_lock(tmp_path):  # free again
        pass


@pytest.mark.slow  # runs a sweep in a subprocess
def test_two_sweep_processes_never_run_a_cell_twice(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(HERE)!r})
        from bitsweep.sweep.grid import expand_grid
        from bitsweep.sweep.results import make_header
        from bitsweep.sweep.runner import run_sweep
        from sweep_fakes import FakeFactory
        run_sweep(expand_grid({GRID!r}), FakeFactory(sleep=0.5), {str(path)!r},
                  make_header({HEADER["identity"]!r}), progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (path.exists() and len(path.read_text().splitlines()) >= 2):  # header + 1 cell
            assert time.monotonic() < deadline, "the first sweep never started"
            time.sleep(0.05)
        with pytest.raises(BitsweepError, match=rf"in use by another sweep \(pid {proc.pid}\)"):
            run_sweep(expand_grid(GRID), FakeFactory(), path, HEADER, progress=False)
        proc.kill()  # dies holding the lock: the kernel releases it, its lock file stays
    finally:
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()
    out = run_sweep(expand_grid(GRID), FakeFactory(), path, HEADER, progress=False)
    ids = Counter(r["cell_id"] for r in read_results(path).rows)
    assert set(ids) == {c.cell_id for c in expand_grid(GRID)} and set(ids.values()) == {1}
    assert out.skipped  # the first sweep's finished cells were kept, not redone
