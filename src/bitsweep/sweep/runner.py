"""Run the cells of a sweep, one results row per cell, resumable and optionally in parallel.

The runner knows nothing about models: it takes an *evaluator factory*, a
picklable callable that loads whatever is shared between cells (model, data,
calibration statistics) and returns a cell function ``cell -> metrics dict``.
Each worker calls the factory once and then evaluates many cells, so the
expensive loading happens once per worker, not once per cell.

Executors:
    ``local``: cells run one after another in this process.
    ``process``: ``jobs`` spawned worker processes, torch threads split between them.
    ``ray``: ``jobs`` Ray actors on an existing cluster (``address``) or a local Ray instance.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bitsweep.errors import BitsweepError
from bitsweep.sweep.grid import Cell
from bitsweep.sweep.lock import sweep_lock
from bitsweep.sweep.results import SweepResults, append_row, open_results, read_results, write_csv

CellFn = Callable[[Cell], dict[str, Any]]
EvaluatorFactory = Callable[[], CellFn]  # picklable for the process and ray executors

EXECUTORS: tuple[str, ...] = ("local", "process", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where cells run.

    Attributes:
        kind: ``local``, ``process`` or ``ray``; ``local`` with ``jobs > 1`` means ``process``.
        jobs: parallel workers; each loads the model and data once.
        address: Ray cluster address (``ray`` only); None starts or reuses a local Ray instance.
        threads: torch threads shared by all workers; None = this process's current count.
    """

    kind: str = "local"
    jobs: int = 1
    address: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.kind!r}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be a positive whole number, got {self.jobs}")
        if self.address is not None and self.kind != "ray":
            raise ValueError("an address only applies to the ray executor; add --executor ray")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")

    @property
    def effective_kind(self) -> str:
        """The executor actually used (``local`` with several jobs becomes ``process``)."""
        return "process" if self.kind == "local" and self.jobs > 1 else self.kind

    def threads_per_worker(self) -> int:
        """Torch threads for each worker, so parallel workers do not oversubscribe the cores."""
        total = self.threads or torch.get_num_threads()
        return max(1, total // self.jobs)


@dataclass(frozen=True)
class SweepRun:
    """What one call of :func:`run_sweep` did.

    Attributes:
        results: the results file after the run (all rows, old and new).
        ran: ids of the cells evaluated by this call, in completion order.
        skipped: ids of the cells already in the results file before this call.
        seconds: wall time of this call.
    """

    results: SweepResults
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    seconds: float


def _row(cell: Cell, metrics: Mapping[str, Any], seconds: float, worker: str) -> dict[str, Any]:
    return {
        "cell_id": cell.cell_id,
        "label": cell.label,
        **cell.to_dict(),
        **metrics,
        "seconds": round(seconds, 3),
        "worker": worker,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _timed(fn: CellFn, cell: Cell) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    metrics = fn(cell)
    if not isinstance(metrics, Mapping):
        raise TypeError(f"the cell function returned {type(metrics).__name__}, expected a dict of metrics")
    return dict(metrics), time.perf_counter() - start


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _run_local(
    factory: EvaluatorFactory, todo: Sequence[Cell], config: ExecutorConfig
) -> Iterator[tuple[Cell, dict[str, Any], float, str]]:
    fn = factory()
    for cell in todo:
        metrics, seconds = _timed(fn, cell)
        yield cell, metrics, seconds, _worker_name()


def _process_worker(factory: EvaluatorFactory, threads: int, tasks: Any, results: Any) -> None:
    """Body of a spawned worker: build the evaluator once, then evaluate cells until told to stop."""
    torch.set_num_threads(threads)
    try:
        fn = factory()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        results.put(("error", None, _describe(e)))
        return
    while True:
        cell = tasks.get()
        if cell is None:
            return
        try:
            metrics, seconds = _timed(fn, cell)
        except BaseException as e:  # noqa: BLE001
            results.put(("error", cell.cell_id, _describe(e)))
            return
        results.put(("ok", cell.cell_id, (metrics, seconds, _worker_name())))


def _describe(e: BaseException) -> tuple[bool, str]:
    """(is a user error, message): user errors keep their one-line message, others their traceback."""
    if isinstance(e, BitsweepError):
        return True, str(e)
    return False, "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _raise_worker_error(cell_id: str | None, info: tuple[bool, str]) -> None:
    user, message = info
    where = f"cell {cell_id}" if cell_id else "worker start-up"
    if user:
        raise BitsweepError(message)
    raise RuntimeError(f"sweep {where} failed in a worker:\n{message}")


def _run_process(
    factory: EvaluatorFactory, todo: Sequence[Cell], config: ExecutorConfig
) -> Iterator[tuple[Cell, dict[str, Any], float, str]]:
    # spawn, not fork: a forked child inherits torch's thread pools in an undefined state.
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    jobs = min(config.jobs, len(todo))
    by_id = {c.cell_id: c for c in todo}
    for cell in todo:
        tasks.put(cell)
    for _ in range(jobs):
        tasks.put(None)
    workers = [
        ctx.Process(target=_process_worker, args=(factory, config.threads_per_worker(), tasks, results), daemon=True)
        for _ in range(jobs)
    ]
    for w in workers:
        w.start()
    remaining = len(todo)
    try:
        while remaining:
            try:
                status, cell_id, payload = results.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError("every sweep worker exited before finishing its cells") from None
                continue
            if status == "error":
                _raise_worker_error(cell_id, payload)
            metrics, seconds, worker = payload
            remaining -= 1
            yield by_id[cell_id], metrics, seconds, worker
    finally:
        if remaining == 0:  # all done: let workers exit on their own, so they release what they hold
            for w in workers:
                w.join(timeout=30)
        for w in workers:  # interrupted, failed, or stuck: stop them now
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join(timeout=10)
        tasks.close()
        results.close()


class _RayWorker:
    """A Ray actor body: builds the evaluator once and evaluates cells on request."""

    def __init__(self, factory: EvaluatorFactory, threads: int) -> None:
        torch.set_num_threads(threads)
        self.fn = factory()

    def run(self, cell: Cell) -> tuple[str, Any]:
        try:
            metrics, seconds = _timed(self.fn, cell)
        except Exception as e:  # noqa: BLE001
            return "error", _describe(e)
        return "ok", (metrics, seconds, _worker_name())


def _run_ray(
    factory: EvaluatorFactory, todo: Sequence[Cell], config: ExecutorConfig
) -> Iterator[tuple[Cell, dict[str, Any], float, str]]:
    try:
        import ray
    except ImportError:
        raise BitsweepError("the ray executor needs Ray: pip install 'bitsweep[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=config.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BitsweepError(
                f"cannot connect to the Ray cluster at {config.address!r}: {e}; check --address"
            ) from None
    threads = config.threads_per_worker()
    actor_cls: Any = ray.remote(num_cpus=threads)(_RayWorker)  # an actor class; Ray's stubs cannot say so
    actors = [actor_cls.remote(factory, threads) for _ in range(min(config.jobs, len(todo)))]
    pending: dict[Any, tuple[Any, Cell]] = {}
    queue_ = list(todo)
    try:
        for actor in actors:
            if queue_:
                cell = queue_.pop(0)
                pending[actor.run.remote(cell)] = (actor, cell)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, cell = pending.pop(ref)
            try:
                status, payload = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"sweep cell {cell.cell_id} failed on Ray: {e}") from None
            if status == "error":
                _raise_worker_error(cell.cell_id, payload)
            metrics, seconds, worker = payload
            if queue_:
                nxt = queue_.pop(0)
                pending[actor.run.remote(nxt)] = (actor, nxt)
            yield cell, metrics, seconds, worker
    finally:
        for actor in actors:
            ray.kill(actor)


def run_sweep(
    cells: Sequence[Cell],
    factory: EvaluatorFactory,
    results_path: str | os.PathLike[str],
    header: Mapping[str, Any],
    executor: ExecutorConfig = ExecutorConfig(),
    progress: bool = True,
) -> SweepRun:
    """Evaluate every cell not yet in ``results_path``, appending one row per finished cell.

    Rows are appended (and fsynced) as cells finish, in completion order, so
    Ctrl-C or a kill loses only the cells in flight; calling this again with
    the same header redoes exactly the unfinished cells. The results file's
    folder is locked meanwhile (:func:`~bitsweep.sweep.lock.sweep_lock`), so a
    second sweep into it stops at once instead of running every cell again.

    Args:
        cells: the grid, e.g. from :func:`~bitsweep.sweep.grid.expand_grid`.
        factory: picklable callable returning the cell function (see module docstring).
        results_path: the JSONL results file; created, or resumed when it exists.
        header: from :func:`~bitsweep.sweep.results.make_header`; its ``identity`` must match on resume.
        executor: where the cells run.
        progress: show a tqdm bar of cells (with the time left) on stderr.

    Raises:
        BitsweepError: for an empty grid, a folder another sweep is using, a results file from another
            sweep, or a user error in a cell.
    """
    if not cells:
        raise BitsweepError("the sweep grid is empty; give at least one weight and one activation bit width")
    start = time.perf_counter()
    path = Path(results_path)
    with sweep_lock(path.parent):  # a second sweep into this folder would run every cell again
        return _run_locked(cells, factory, path, header, executor, progress, start)


def _run_locked(
    cells: Sequence[Cell],
    factory: EvaluatorFactory,
    path: Path,
    header: Mapping[str, Any],
    executor: ExecutorConfig,
    progress: bool,
    start: float,
) -> SweepRun:
    """:func:`run_sweep` once the output folder's lock is held."""
    existing = open_results(path, header)
    done = existing.finished_ids
    todo = [c for c in cells if c.cell_id not in done]
    skipped = tuple(c.cell_id for c in cells if c.cell_id in done)
    ran: list[str] = []
    kind = executor.effective_kind
    runner = {"local": _run_local, "process": _run_process, "ray": _run_ray}[kind]
    bar = tqdm(total=len(cells), initial=len(skipped), unit="cell", desc="sweep", file=sys.stderr, disable=not progress)
    try:
        if todo:
            for cell, metrics, seconds, worker in runner(factory, todo, executor):
                append_row(path, _row(cell, metrics, seconds, worker))
                ran.append(cell.cell_id)
                bar.set_postfix_str(cell.label, refresh=False)
                bar.update(1)
    finally:
        bar.close()
    results = read_results(path)
    if not ran and results.rows:
        write_csv(results)  # the CSV may be missing if the previous run died between the two writes
    return SweepRun(results=results, ran=tuple(ran), skipped=skipped, seconds=time.perf_counter() - start)
