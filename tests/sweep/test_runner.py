from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bitsweep.errors import BitsweepError
from bitsweep.sweep.grid import expand_grid
from bitsweep.sweep.results import make_header, read_results
from bitsweep.sweep.runner import ExecutorConfig, run_sweep

from sweep_fakes import FakeFactory, fake_metrics, logged_ids

HERE = Path(__file__).resolve().parent
GRID = {"weight_bits": [1, 2, 4], "activation_bits": [4, 8]}
HEADER = make_header({"checkpoint_sha256": "abc", "dataset": "synthetic"}, environment={"torch": "x"})


def test_local_sweep_writes_consistent_jsonl_and_csv(tmp_path: Path) -> None:
    cells = expand_grid(GRID)
    out = run_sweep(cells, FakeFactory(), tmp_path / "results.jsonl", HEADER, progress=False)
    assert out.ran == tuple(c.cell_id for c in cells) and out.skipped == ()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["identity"] == HEADER["identity"]
    assert len(lines) == 1 + len(cells)
    rows = out.results.rows
    for cell, row in zip(cells, rows, strict=True):
        assert row["cell_id"] == cell.cell_id
        assert row["weight_bits"] == cell.weight_bits and row["activation_bits"] == cell.activation_bits
        assert row["val_top1"] == fake_metrics(cell)["val_top1"]
        assert row["seconds"] >= 0
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["cell_id"] for r in table] == [r["cell_id"] for r in rows]
    assert [float(r["val_top1"]) for r in table] == [r["val_top1"] for r in rows]
    assert table[0]["weight_bits"] == ""  # the FP32 baseline has no bit width
    assert out.results.baseline["label"] == "FP32"


def test_interrupted_sweep_resumes_only_missing_cells(tmp_path: Path) -> None:
    cells = expand_grid(GRID)
    path = tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cells, FakeFactory(interrupt_after=3), path, HEADER, progress=False)
    first = read_results(path).finished_ids
    assert first == {c.cell_id for c in cells[:3]}
    log = tmp_path / "log"
    log.mkdir()
    out = run_sweep(cells, FakeFactory(log_dir=str(log)), path, HEADER, progress=False)
    assert set(out.ran) == {c.cell_id for c in cells[3:]}
    assert logged_ids(log) == sorted(c.cell_id for c in cells[3:])
    assert set(out.skipped) == first
    assert len(out.results.rows) == len(cells)
    # a third run has nothing to do
    again = run_sweep(cells, FakeFactory(log_dir=str(log)), path, HEADER, progress=False)
    assert again.ran == () and len(logged_ids(log)) == len(cells) - 3


@pytest.mark.slow  # spawns processes
def test_killed_sweep_process_resumes(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(HERE)!r})
        from bitsweep.sweep.grid import expand_grid
        from bitsweep.sweep.results import make_header
        from bitsweep.sweep.runner import run_sweep
        from sweep_fakes import FakeFactory
        run_sweep(expand_grid({GRID!r}), FakeFactory(sleep=0.4), {str(path)!r},
                  make_header({HEADER["identity"]!r}), progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= 3:  # header + 2 cells
                break
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait()
    # simulate a kill in the middle of an append: a partial last line
    with open(path, "a") as f:
        f.write('{"kind": "cell", "cell_id": "dead')
    before = read_results(path).finished_ids
    cells = expand_grid(GRID)
    assert 2 <= len(before) < len(cells)
    log = tmp_path / "log"
    log.mkdir()
    out = run_sweep(cells, FakeFactory(log_dir=str(log)), path, HEADER, progress=False)
    assert set(logged_ids(log)) == {c.cell_id for c in cells} - before
    assert sorted(r["cell_id"] for r in out.results.rows) == sorted(c.cell_id for c in cells)
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_results_written_before_the_method_axis_resume_without_recomputing(tmp_path: Path) -> None:
    # The checked-in file was written by the code before `method` existed; today's grid adds the axis.
    path = tmp_path / "results.jsonl"
    path.write_bytes((HERE / "data" / "v1_results.jsonl").read_bytes())
    old = read_results(path)
    cells = expand_grid({**old.header["grid"], "method": ["rtn"]})
    log = tmp_path / "log"
    log.mkdir()
    out = run_sweep(cells, FakeFactory(log_dir=str(log)), path, old.header, progress=False)
    assert out.ran == () and logged_ids(log) == []
    assert set(out.skipped) == old.finished_ids and len(out.skipped) == len(cells) == 5
    assert out.results.rows == old.rows


def test_resume_from_another_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    cells = expand_grid({"weight_bits": [4], "activation_bits": [8]})
    run_sweep(cells, FakeFactory(), path, HEADER, progress=False)
    other = make_header({"checkpoint_sha256": "def", "dataset": "synthetic"})
    with pytest.raises(BitsweepError, match="checkpoint_sha256: file has 'abc', this sweep has 'def'.*--output"):
        run_sweep(cells, FakeFactory(), path, other, progress=False)


def test_not_a_results_file_and_empty_grid(tmp_path: Path) -> None:
    bogus = tmp_path / "results.jsonl"
    bogus.write_text('{"hello": 1}\n')
    with pytest.raises(BitsweepError, match="not a bitsweep sweep results file"):
        read_results(bogus)
    with pytest.raises(BitsweepError, match="not found"):
        read_results(tmp_path / "missing.jsonl")
    with pytest.raises(BitsweepError, match="empty"):
        run_sweep([], FakeFactory(), tmp_path / "r.jsonl", HEADER, progress=False)


def test_user_error_in_a_cell_stops_with_its_message(tmp_path: Path) -> None:
    cells = expand_grid({"weight_bits": [4], "activation_bits": [8]})
    with pytest.raises(BitsweepError, match="cannot quantize W4A8"):
        run_sweep(cells, FakeFactory(fail_label=cells[1].label), tmp_path / "r.jsonl", HEADER, progress=False)
    assert len(read_results(tmp_path / "r.jsonl").rows) == 1  # the baseline finished and was kept


@pytest.mark.slow  # spawns processes
def test_process_executor_runs_each_cell_once(tmp_path: Path) -> None:
    cells = expand_grid(GRID)
    log = tmp_path / "log"
    log.mkdir()
    ex = ExecutorConfig(kind="process", jobs=2, threads=2)
    out = run_sweep(cells, FakeFactory(log_dir=str(log)), tmp_path / "r.jsonl", HEADER, ex, progress=False)
    assert sorted(out.ran) == sorted(c.cell_id for c in cells)
    assert logged_ids(log) == sorted(c.cell_id for c in cells)
    by_id = {r["cell_id"]: r for r in out.results.rows}
    assert all(by_id[c.cell_id]["val_top1"] == fake_metrics(c)["val_top1"] for c in cells)
    assert ex.threads_per_worker() == 1


@pytest.mark.slow  # spawns processes
def test_process_executor_reports_worker_errors(tmp_path: Path) -> None:
    cells = expand_grid({"weight_bits": [4], "activation_bits": [8]}, include_baseline=False)
    ex = ExecutorConfig(kind="process", jobs=2)
    with pytest.raises(BitsweepError, match="cannot quantize"):
        run_sweep(cells, FakeFactory(fail_label=cells[0].label), tmp_path / "r.jsonl", HEADER, ex, progress=False)


def test_executor_config_validation() -> None:
    with pytest.raises(ValueError, match="executor must be one of"):
        ExecutorConfig(kind="dask")
    with pytest.raises(ValueError, match="--executor ray"):
        ExecutorConfig(address="ray://x:10001")
    with pytest.raises(ValueError, match="jobs"):
        ExecutorConfig(jobs=0)
    assert ExecutorConfig(jobs=3).effective_kind == "process"


@pytest.mark.slow  # starts Ray
@pytest.mark.timeout(300)  # starting Ray on a 2-core box shared with other jobs took over 120 s
def test_ray_executor_on_a_local_instance(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    import sweep_fakes

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.cloudpickle.register_pickle_by_value(sweep_fakes)  # the test module is not importable in Ray workers
        cells = expand_grid(GRID)
        ex = ExecutorConfig(kind="ray", jobs=2, threads=2)
        out = run_sweep(cells, FakeFactory(), tmp_path / "r.jsonl", HEADER, ex, progress=False)
        assert sorted(out.ran) == sorted(c.cell_id for c in cells)
        assert len({r["worker"] for r in out.results.rows}) == 2
    finally:
        ray.shutdown()
