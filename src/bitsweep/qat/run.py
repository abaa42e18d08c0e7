"""``qat``: quantization-aware training of a float checkpoint, ending in an integer-exact quantized checkpoint.

One run is: load the float checkpoint, start from a post-training result (:func:`prepare_qat`),
train with :func:`bitsweep.training.fit` (its run directory, metrics, TensorBoard, curves, atomic
checkpoints, exact ``--resume`` and DDP; validation accuracy each epoch is the fake-quantized
model's), then :func:`convert_qat` the best epoch and measure it with the integer-exact simulation.
The run directory gets ``quantized.pt`` (a quantized checkpoint every other command reads) and
``qat.json`` (float, start and final accuracies, settings, times) besides fit's files.

The run's ``best.pt``/``last.pt`` hold the training state (float weights and learned scales): they
resume the run; ``quantized.pt`` is the model.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsweep.artifacts import Loaded, load
from bitsweep.artifacts.quantized import quantized_state, save_quantized
from bitsweep.backend.simulate import evaluation_model, runner_for
from bitsweep.config import RunConfig, from_dict, to_dict
from bitsweep.data import DatasetSplits, TensorLoader, load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.io import write_json_atomic
from bitsweep.models import to_channels_last
from bitsweep.qat.config import QATConfig
from bitsweep.qat.distill import DistillationLoss
from bitsweep.qat.prepare import convert_qat, prepare_qat
from bitsweep.quant import QuantConfig
from bitsweep.runtime import choose_device, make_run_dir
from bitsweep.training import EvalResult, FitResult, checkpoint_info, evaluate, fit, load_checkpoint
from bitsweep.training.fit import EpochCallback

# The fine-tuning recipe QAT starts from (TrainConfig fields; the float run's other settings stay).
QAT_TRAIN_DEFAULTS: Mapping[str, Any] = {
    "epochs": 3,
    "lr": 0.01,
    "weight_decay": 5e-5,
    "warmup_epochs": 0.0,
    "label_smoothing": 0.0,
}
QUANTIZED_FILE, RESULTS_FILE = "quantized.pt", "qat.json"
# ``--compile auto`` compiles the training forward from this many steps on: compiling takes one to two
# minutes on 2 CPU cores and then saves about 0.8 s per W4A4 MobileNet-v2 x0.5 step of 128 images.
COMPILE_MIN_STEPS = 300


@dataclass(frozen=True)
class QATResult:
    """What a QAT run produced (rank 0; other DDP ranks get ``quantized`` None and no accuracies).

    Attributes:
        run_dir: the run directory.
        quantized: the quantized checkpoint of the best epoch (``run_dir/quantized.pt``).
        fit: the training loop's result (per-epoch metrics, best/last checkpoints).
        accuracy: ``{"float"|"start"|"final": {"val"|"test": EvalResult}}``; ``float`` and ``start`` (the PTQ
            starting point) are absent when resuming or when they were not asked for.
        simulation: what measured ``start`` and ``final`` (``integer-exact`` unless the lowering refused).
        seconds: wall time of the whole run.
    """

    run_dir: Path
    quantized: Path | None
    fit: FitResult
    accuracy: dict[str, dict[str, EvalResult]]
    simulation: str
    seconds: float


def _run_config(source: RunConfig, train: Mapping[str, Any], run_dir: Path) -> RunConfig:
    """The float run's config with the QAT fine-tuning recipe and this run's folder."""
    data = to_dict(source)
    data["train"].update({**QAT_TRAIN_DEFAULTS, **train})
    data["data"]["download"] = False
    data["output_dir"], data["run_name"] = str(run_dir.parent), run_dir.name
    try:
        return from_dict(RunConfig, data)
    except (BitsweepError, ValueError) as e:
        raise BitsweepError(f"bad QAT training setting: {e}") from None


def _with_training_compile(config: RunConfig, mode: str, train_images: int) -> RunConfig:
    """``config`` with ``train.compile`` as ``--compile MODE`` decides it for a run on ``train_images`` images.

    ``auto`` compiles when the run has at least :data:`COMPILE_MIN_STEPS` steps (or the settings
    already asked for it). Compiling changes float rounding only (fused kernels); the accuracies QAT
    reports come from the eager validation pass and the integer-exact simulation.
    """
    tc = config.train
    steps = tc.epochs * (train_images // tc.batch_size)  # the last partial batch is dropped
    on = mode == "on" or (mode == "auto" and (tc.compile or steps >= COMPILE_MIN_STEPS))
    return dataclasses.replace(config, train=dataclasses.replace(tc, compile=on))


def _teacher(path: str | Path | None, student: Loaded, num_classes: int) -> tuple[nn.Module, str]:
    """The float teacher (default: the checkpoint QAT starts from), checked against the student's classes."""
    if path is None:
        return copy.deepcopy(student.model), str(student.path)
    loaded = load(path, "cpu", expect="float")
    if loaded.record.num_classes != num_classes:
        raise BitsweepError(
            f"teacher '{path}' predicts {loaded.record.num_classes} classes but the model has {num_classes}; "
            "pass a teacher trained on the same dataset, or --no-distill"
        )
    if loaded.record.input_shape != student.record.input_shape:
        raise BitsweepError(
            f"teacher '{path}' takes {_shape(loaded.record.input_shape)} images but the model "
            f"{_shape(student.record.input_shape)}; pass a teacher trained on the same dataset, or --no-distill"
        )
    return loaded.model, str(loaded.path)


def _shape(chw: tuple[int, int, int]) -> str:
    return f"{chw[0]}x{chw[1]}x{chw[2]}"


def _integer_accuracy(
    model: nn.Module, splits: DatasetSplits, loader_kw: dict[str, Any], compile_mode: str, batch_size: int
) -> tuple[dict[str, EvalResult], str]:
    """Val and test accuracy of a converted model from the integer-exact simulation."""
    sets = {name: s for name, s in (("val", splits.val), ("test", splits.test)) if len(s.labels) > 0}
    runner = runner_for(compile_mode, sum(len(s.labels) for s in sets.values()), batch_size)
    example = torch.zeros(1, splits.in_channels, *splits.image_size, device=loader_kw["device"])
    evaluated, simulation = evaluation_model(model, example, runner)
    return {
        name: evaluate(evaluated, TensorLoader(s, batch_size, **loader_kw), device=loader_kw["device"])
        for name, s in sets.items()
    }, simulation


def qat(
    checkpoint: str | Path,
    quant: QuantConfig,
    recipe: QATConfig | None = None,
    *,
    train: Mapping[str, Any] | None = None,
    teacher: str | Path | None = None,
    run_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    splits: DatasetSplits | None = None,
    init_options: Mapping[str, Any] | None = None,
    evaluate_start: bool = True,
    compile_mode: str = "auto",
    eval_batch_size: int = 40,
    progress: bool = True,
    callbacks: Sequence[EpochCallback] = (),
) -> QATResult:
    """Quantization-aware training of the float ``checkpoint`` at ``quant``'s bit widths.

    Args:
        checkpoint: a float checkpoint (or its run directory).
        quant: bit widths, ranges and per-layer overrides (as for ``bitsweep quantize``).
        recipe: LSQ or STE, the PTQ starting point, distillation (default ``QATConfig()``).
        train: :class:`~bitsweep.config.TrainConfig` fields over :data:`QAT_TRAIN_DEFAULTS` (``epochs``,
            ``lr``, ``batch_size``, ...); the float run's data and augmentation settings are kept.
        teacher: the float checkpoint to distil from (default: ``checkpoint``).
        run_dir: where to write the run (default: ``qat-w<W>a<A>-<method>`` beside the checkpoint, made unique).
        device: where to train (default: the float run's ``device`` setting).
        splits: already-loaded data (default: the float run's dataset and validation split).
        init_options: settings of the starting PTQ method (see :func:`bitsweep.quant.ptq`).
        evaluate_start: also measure the float model and the PTQ starting point (integer-exact) on the
            validation and test splits, to show what training gained.
        compile_mode: ``auto``/``on``/``off``: compile the training forward (``auto``: from
            :data:`COMPILE_MIN_STEPS` steps) and the integer-exact simulation (``auto``: from 5,000 images).
        eval_batch_size: batch size of the integer-exact evaluations.
        progress: progress bars.
        callbacks: called as ``cb(epoch, row)`` after each epoch's checkpoint (see :func:`~bitsweep.training.fit`).

    Raises:
        BitsweepError: one line for a checkpoint that is not a float one, a teacher with other classes,
            bad training settings, missing data, or nothing to quantize.
    """
    started = time.perf_counter()
    recipe = recipe if recipe is not None else QATConfig()
    loaded = load(checkpoint, "cpu", expect="float")
    info = checkpoint_info(loaded.meta)
    if run_dir is None:
        w = quant.weight.bits if quant.weight is not None else "f"
        a = quant.activation.bits if quant.activation is not None else "f"
        folder = make_run_dir(loaded.path.parent, None, f"qat-w{w}a{a}-{recipe.method}")
    else:
        folder = Path(run_dir)
    config = _run_config(info.config, dict(train or {}), folder)
    teacher_model, teacher_path = _teacher(teacher, loaded, loaded.record.num_classes) if recipe.distill else (None, "")
    described = {
        "quant_config": to_dict(quant),
        "recipe": to_dict(recipe),
        "source": str(loaded.path),
        "teacher": teacher_path or None,
        "train": dict(train or {}),
    }
    job = _Job(loaded, config, quant, recipe, teacher_model, described, folder, resume=None)
    options = _Options(
        device,
        splits,
        dict(init_options or {}),
        evaluate_start,
        compile_mode,
        eval_batch_size,
        progress,
        tuple(callbacks),
    )
    return _run(job, options, started)


def resume_qat(
    run: str | Path,
    *,
    device: torch.device | str | None = None,
    splits: DatasetSplits | None = None,
    compile_mode: str = "auto",
    eval_batch_size: int = 40,
    progress: bool = True,
) -> QATResult:
    """Continue an interrupted QAT run exactly (its directory or its last.pt), with its own settings.

    Raises:
        BitsweepError: the path is not an interrupted QAT run, or its float checkpoint is gone.
    """
    started = time.perf_counter()
    last = Path(run) / "last.pt" if Path(run).is_dir() else Path(run)
    state = load_checkpoint(last)
    described = state.get("qat")
    if not isinstance(described, dict):
        raise BitsweepError(f"'{last}' is not a QAT run's checkpoint; resume plain training with 'bitsweep train'")
    loaded = load(described["source"], "cpu", expect="float")
    quant = from_dict(QuantConfig, described["quant_config"])
    recipe = from_dict(QATConfig, described["recipe"])
    teacher_model = _teacher(described["teacher"], loaded, loaded.record.num_classes)[0] if recipe.distill else None
    config = from_dict(RunConfig, state["config"])
    job = _Job(loaded, config, quant, recipe, teacher_model, described, last.parent, resume=last)
    options = _Options(device, splits, {}, False, compile_mode, eval_batch_size, progress)
    return _run(job, options, started)


@dataclass(frozen=True)
class _Job:
    """What one QAT run trains: the float model, its settings, and where the run lives."""

    loaded: Loaded
    config: RunConfig
    quant: QuantConfig
    recipe: QATConfig
    teacher: nn.Module | None
    described: dict[str, Any]  # what results.json and the checkpoint record of the run
    folder: Path
    resume: Path | None  # the last.pt to continue from, or None for a new run


@dataclass(frozen=True)
class _Options:
    """How a QAT run is carried out; none of it changes what is trained."""

    device: torch.device | str | None
    splits: DatasetSplits | None
    init_options: dict[str, Any]
    evaluate_start: bool
    compile_mode: str
    eval_batch_size: int
    progress: bool = True
    callbacks: tuple[EpochCallback, ...] = ()


def _run(job: _Job, opts: _Options, started: float) -> QATResult:
    dev = choose_device(job.config.device) if opts.device is None else torch.device(opts.device)
    data = opts.splits if opts.splits is not None else load_dataset(job.config.data, job.config.seed)
    if data.num_classes != job.loaded.record.num_classes:
        raise BitsweepError(
            f"the data has {data.num_classes} classes but the checkpoint's model "
            f"{job.loaded.record.num_classes}; QAT runs on the dataset the model was trained on"
        )
    job = dataclasses.replace(job, config=_with_training_compile(job.config, opts.compile_mode, len(data.train.labels)))
    loader_kw: dict[str, Any] = {"mean": data.mean, "std": data.std, "device": dev}
    float_model = job.loaded.model.to(dev).eval()
    accuracy: dict[str, dict[str, EvalResult]] = {}
    if opts.evaluate_start and job.resume is None:
        accuracy["float"] = {
            name: evaluate(float_model, TensorLoader(s, opts.eval_batch_size, **loader_kw), device=dev)
            for name, s in (("val", data.val), ("test", data.test))
            if len(s.labels) > 0
        }
    model = copy.deepcopy(float_model)
    calibration = TensorLoader(data.train, job.config.train.batch_size, shuffle=True, seed=job.config.seed, **loader_kw)
    # Resuming rebuilds the same structure (same calibration, so the same grids) and then loads the trained state.
    start_recipe = dataclasses.replace(job.recipe, init="rtn") if job.resume is not None else job.recipe
    prepared = prepare_qat(
        model, job.quant, calibration, start_recipe, options={"progress": opts.progress, **opts.init_options}
    )
    simulation = ""
    if opts.evaluate_start and job.resume is None:
        start = convert_qat(copy.deepcopy(model), job.quant.scale_dtype)
        accuracy["start"], simulation = _integer_accuracy(
            start, data, loader_kw, opts.compile_mode, opts.eval_batch_size
        )
        del start
    loss: nn.Module | None = None
    if job.teacher is not None:
        teacher = job.teacher.to(dev).eval()
        teacher = to_channels_last(teacher) if job.config.train.channels_last else teacher
        loss = DistillationLoss(
            teacher, job.recipe.temperature, job.recipe.distill_weight, job.config.train.label_smoothing
        )
    result = fit(
        job.config,
        run_dir=job.folder,
        resume=job.resume,
        device=dev,
        splits=data,
        progress=opts.progress,
        model=model,
        callbacks=opts.callbacks,
        loss_fn=loss,
        record=job.loaded.record,
        checkpoint_extra={"qat": job.described},
    )
    if not result.metrics:  # a non-zero DDP rank: rank 0 converts and writes
        return QATResult(result.run_dir, None, result, accuracy, simulation, time.perf_counter() - started)
    model = convert_qat(model, job.quant.scale_dtype)  # fit left the best epoch's weights in it
    accuracy["final"], simulation = _integer_accuracy(model, data, loader_kw, opts.compile_mode, opts.eval_batch_size)
    out = result.run_dir / QUANTIZED_FILE
    save_quantized(
        out,
        quantized_state(
            model.cpu(),
            dataclasses.replace(job.quant, method=job.recipe.init),
            job.loaded.meta,
            prepared.start.summary,
            job.loaded.record,
        ),
    )
    seconds = time.perf_counter() - started
    write_json_atomic(
        result.run_dir / RESULTS_FILE,
        {
            **job.described,
            "quantized": str(out),
            "simulation": simulation,
            "seconds": seconds,
            "epochs": [dict(r) for r in result.metrics],
            "accuracy": {k: {s: dataclasses.asdict(e) for s, e in v.items()} for k, v in accuracy.items()},
        },
    )
    return QATResult(result.run_dir, out, result, accuracy, simulation, seconds)
