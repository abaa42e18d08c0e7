"""One call from a trained checkpoint to a finished sweep: grid, runner, Pareto front, recommendation.

The CLI (``bitsweep sweep``) and ``bitsweep quickstart`` both call
:func:`sweep_checkpoint`; the Python API can too. The report is not built
here: ``bitsweep.report`` reads sweep results, so it sits above this package,
and its caller (the CLI, or a user's script) builds it from the results file
with ``bitsweep.report.build_report(outcome.run.results)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsweep.artifacts import ModelRecord, load
from bitsweep.artifacts.checkpoint import resolve
from bitsweep.errors import BitsweepError
from bitsweep.runtime import environment
from bitsweep.sweep.evaluate import CheckpointEvaluator, EvalSettings, file_sha256, quant_config_for
from bitsweep.sweep.grid import Cell, PerLayerPlan, expand_grid, plan_cell, spread_compiles
from bitsweep.sweep.pareto import Recommendation, pareto_front, recommend
from bitsweep.sweep.results import make_header
from bitsweep.sweep.runner import ExecutorConfig, SweepRun, run_sweep
from bitsweep.training import checkpoint_info, load_checkpoint

# EvalSettings fields added after results files existed, with their defaults: at the default they stay out
# of a results file's identity, so files written before them still resume.
LATER_SETTINGS: dict[str, Any] = {"method_images": 1024, "method_iterations": None, "stop_collapsed": True}


@dataclass(frozen=True)
class SweepOutcome:
    """Everything a finished sweep produced.

    Attributes:
        run: the runner's record (results file, which cells ran now, which were resumed).
        front: Pareto-optimal rows (packed size vs validation top-1), smallest first.
        recommendation: the smallest configuration within the accuracy budget.
    """

    run: SweepRun
    front: tuple[Mapping[str, Any], ...]
    recommendation: Recommendation


def sweep_checkpoint(
    checkpoint: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    axes: Mapping[str, Sequence[Any]],
    settings: EvalSettings = EvalSettings(),
    executor: ExecutorConfig = ExecutorConfig(),
    device: torch.device | str = "cpu",
    data_dir: str | None = None,
    max_drop: float = 1.0,
    keep_packed: bool = True,
    progress: bool = True,
    quantized: Sequence[str | os.PathLike[str]] = (),
    layer_bits: Sequence[tuple[str | os.PathLike[str], PerLayerPlan]] = (),
) -> SweepOutcome:
    """Sweep the grid ``axes`` over ``checkpoint``; resumes when ``output_dir`` holds an unfinished sweep.

    Writes ``output_dir/results.jsonl`` and ``results.csv`` and each cell's
    packed model file under ``output_dir/packed/`` (``keep_packed``). While it
    runs, ``output_dir`` is locked: a second sweep into it stops at once.

    Args:
        checkpoint: a bitsweep checkpoint (``best.pt``) or run directory.
        output_dir: where results go; rerunning with the same directory resumes.
        axes: sweep axes, e.g. ``{"weight_bits": [2, 4, 8], "activation_bits": [4, 8]}``.
        settings: calibration and evaluation settings (part of the results' identity).
        executor: local, process pool or Ray, and how many workers.
        device: device each worker evaluates on.
        data_dir: dataset location when it is not where the checkpoint's config says.
        max_drop: accuracy budget (validation top-1 points below FP32) of the recommendation.
        keep_packed: keep every cell's packed model file.
        progress: show the progress bar.
        quantized: quantized checkpoints of the same network (a QAT run's ``quantized.pt``, ``bitsweep
            quantize`` outputs) measured as extra cells against the same FP32 baseline, so the front and
            the recommendation can pick them.
        layer_bits: (file, plan) pairs of per-layer bit widths (``bitsweep.search.load_layer_bits``): each
            plan is quantized from the float model like the grid's cells, once per combination of the
            non-bit axes (see :func:`layer_bits_cells`). Check its names first
            (``load_layer_bits(file, layer_names(model))``); a cell naming a missing layer fails when it runs.

    Raises:
        BitsweepError: bad grid, missing checkpoint, a results file from another sweep, a folder
            another sweep is using, ...
    """
    cells = spread_compiles(expand_grid(axes))  # workers start on different compiled graphs
    cells += [c for path, plan in layer_bits for c in layer_bits_cells(path, plan, axes)]
    for cell in cells:  # reject a bad observer or combination before any worker starts
        if not cell.is_baseline:
            quant_config_for(cell)
    recommend([], 0.0, max_drop)  # validates max_drop up front
    state = load_checkpoint(Path(checkpoint))
    info = checkpoint_info(state)
    cells += [checkpoint_cell(path, info.record) for path in quantized]
    cells = list({c.cell_id: c for c in cells}.values())  # a file given twice is one cell
    ckpt_path = Path(checkpoint)
    ckpt_path = resolve(ckpt_path)
    del state
    out = Path(output_dir)
    identity = {
        "checkpoint_sha256": file_sha256(ckpt_path),
        "dataset": info.data.name,
        "model": info.model.name,
        "width": info.model.width,
        **{
            f"eval.{k}": v
            for k, v in dataclasses.asdict(settings).items()
            # compile: same results either way; later settings only when set, so older files still resume
            if k != "compile" and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])
        },
    }
    dev = torch.device(device)
    header = make_header(
        identity,
        checkpoint=str(ckpt_path.resolve()),
        checkpoint_metrics=info.metrics,
        grid={k: list(v) for k, v in axes.items()},
        max_drop=max_drop,
        executor=dataclasses.asdict(executor),
        environment=environment(dev),
    )
    factory = CheckpointEvaluator(
        checkpoint=str(ckpt_path.resolve()),
        settings=settings,
        device=str(dev),
        data_dir=data_dir,
        packed_dir=str((out / "packed").resolve()) if keep_packed else None,
    )
    if keep_packed:
        (out / "packed").mkdir(parents=True, exist_ok=True)
    run = run_sweep(cells, factory, out / "results.jsonl", header, executor, progress=progress)
    rows = [r for r in run.results.rows if r["cell_id"] in {c.cell_id for c in cells}]
    base = run.results.baseline
    if base is None or base.get("val_top1") is None:
        raise BitsweepError("the sweep finished without its FP32 baseline row; rerun the same command to complete it")
    rec = recommend(rows, float(base["val_top1"]), max_drop)
    return SweepOutcome(run=run, front=tuple(pareto_front(rows)), recommendation=rec)


def checkpoint_cell(path: str | os.PathLike[str], record: ModelRecord) -> Cell:
    """The sweep cell that measures the quantized checkpoint ``path`` (of the network ``record`` describes).

    Raises:
        BitsweepError: not a quantized checkpoint, or one of another network.
    """
    loaded = load(Path(path), "cpu", expect="quantized")
    config = loaded.quant_config
    assert config is not None
    if (
        loaded.record.name != record.name
        or loaded.record.num_classes != record.num_classes
        or (loaded.record.options != record.options)
    ):
        raise BitsweepError(
            f"'{path}' quantizes {loaded.record.label} ({loaded.record.num_classes} classes), but the sweep's "
            f"checkpoint is {record.label} ({record.num_classes} classes); add quantized checkpoints of the swept model"
        )
    weight, act = config.weight, config.activation
    return Cell(
        weight_bits=weight.bits if weight is not None else None,
        activation_bits=act.bits if act is not None else None,
        granularity=weight.granularity if weight is not None else "per_channel",
        observer=config.weight_observer
        if config.activation_observer == config.weight_observer
        else f"{config.weight_observer}/{config.activation_observer}",
        symmetric=weight.symmetric if weight is not None else True,
        method=config.method,
        checkpoint=str(loaded.path.resolve()),
    )


def layer_bits_cells(path: str | os.PathLike[str], plan: PerLayerPlan, axes: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """The cells of a per-layer plan: one per combination of the grid's non-bit axes (usually one).

    The plan replaces the weight and activation bit axes; granularity, observer, symmetry and method
    still come from the grid, so the plan is quantized exactly like the uniform cells beside it.

    >>> class P:
    ...     weight_bits, activation_bits, weights, activations = 8, 8, {"fc": 2}, {}
    >>> [c.label for c in layer_bits_cells("/s/plan.yaml", P(), {"weight_bits": [2, 4], "observer": ["minmax", "mse"]})]
    ['mixed per_channel minmax from s/plan.yaml', 'mixed per_channel mse from s/plan.yaml']
    """
    others = {k: v for k, v in axes.items() if k not in ("weight_bits", "activation_bits")}
    return [plan_cell(path, plan, like) for like in expand_grid(others, include_baseline=False)]


def format_front(front: Sequence[Mapping[str, Any]]) -> str:
    """The Pareto front as aligned text lines for the terminal."""
    lines = [f"{'cell':<34} {'val top-1':>9} {'test top-1':>10} {'size (bytes)':>13} {'ratio':>7}"]
    for r in front:
        test = float(r.get("test_top1") or float("nan"))
        lines.append(
            f"{str(r.get('label')):<34} {float(r['val_top1']):>9.2f} {test:>10.2f} "
            f"{int(r['size_bytes']):>13,} {float(r.get('model_ratio') or 1.0):>6.2f}x"
        )
    return "\n".join(lines)


# The quickstart's grid: small enough to stay well under a minute on 8x8 digits with 2 CPU cores.
QUICKSTART_AXES: dict[str, list[int]] = {"weight_bits": [2, 4, 8], "activation_bits": [4, 8]}


def quickstart_sweep(
    checkpoint: str | os.PathLike[str], run_dir: str | os.PathLike[str], progress: bool = True
) -> SweepOutcome:
    """The sweep ``bitsweep quickstart`` ends with: :data:`QUICKSTART_AXES` into ``run_dir/sweep``."""
    return sweep_checkpoint(
        checkpoint,
        Path(run_dir) / "sweep",
        QUICKSTART_AXES,
        EvalSettings(calib_batches=4, calib_batch_size=128, eval_batch_size=512),
        device="cpu",
        progress=progress,
    )


__all__ = ["Cell", "QUICKSTART_AXES", "SweepOutcome", "format_front", "quickstart_sweep", "sweep_checkpoint"]
