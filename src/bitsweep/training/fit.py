"""The training loop: ``fit(config) -> FitResult``, one run directory per run, exact resume.

Everything a run depends on comes from its :class:`~bitsweep.config.RunConfig`
and seed, plus, for runs that train something other than a fresh registry
model (quantization-aware training, distillation, fine-tuning a pruned
network), the model and the loss the caller passes in. Data order and augmentation depend only on (seed, epoch, rank)
(see ``TensorLoader.set_epoch``), and last.pt stores model, optimizer,
schedule and every RNG state after each epoch, so an interrupted CPU run
resumed from last.pt ends with weights bitwise identical to an uninterrupted
one.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from bitsweep.artifacts import ModelRecord
from bitsweep.config import RunConfig, to_dict
from bitsweep.data import DatasetSplits, TensorLoader, load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.io import write_json_atomic, write_text_atomic
from bitsweep.models import create_model, list_models, to_channels_last
from bitsweep.runtime import autocast, choose_device, environment, make_run_dir, seed_everything
from bitsweep.training import distributed as dist_utils
from bitsweep.training.checkpoint import (
    capture_rng,
    check_compatible,
    checkpoint_info,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)  # fmt: skip
from bitsweep.training.compiled import CompiledOrEager
from bitsweep.training.evaluate import EvalResult, evaluate
from bitsweep.training.loggers import MetricsLogger, plot_curves
from bitsweep.training.optim import build_optimizer, build_schedule

EpochCallback = Callable[[int, dict[str, Any]], None]
# loss_fn(logits, targets) or loss_fn(logits, targets, images) -> scalar loss (e.g. distillation reads the images).
LossFn = Callable[..., torch.Tensor]

# Settings that may differ between an interrupted run and its resumption: they
# change where and how fast the run goes, not what it computes.
_RESUMABLE_CHANGES = frozenset(
    {"device", "output_dir", "run_name", "data.data_dir", "data.download", "train.compile", "train.tensorboard",
     "train.wandb", "train.eval_batch_size"}
)  # fmt: skip


@dataclass(frozen=True)
class FitResult:
    """Where a finished run wrote its files, its per-epoch metrics, and the best model's final scores."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    metrics: list[dict[str, Any]]
    test: EvalResult
    val: EvalResult


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _resume_state(config: RunConfig, resume: str | Path) -> dict[str, Any]:
    """Load last.pt for resuming and refuse a config that would compute something else."""
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    state = load_checkpoint(path)
    if "optimizer" not in state or "rng" not in state:
        raise BitsweepError(f"'{path}' has no optimizer state (only last.pt does); resume from the run's last.pt")
    info = checkpoint_info(state)
    check_compatible(info, path, model=config.model.name)
    if config.data.name != info.data.name:
        raise BitsweepError(
            f"checkpoint '{path}' was trained on {info.data.name}, but the config asks for {config.data.name}; "
            "resume with the run's own config (bitsweep train --resume RUN_DIR without --config)"
        )
    new, old = _flatten(to_dict(config)), _flatten(state["config"])
    changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise BitsweepError(
            f"cannot resume '{path}' with a different recipe ({diffs}); resuming continues the same schedule, "
            "so drop those options or start a new run"
        )
    state["_path"] = str(path)
    return state


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(
    config: RunConfig,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    device: torch.device | str | None = None,
    *,
    splits: DatasetSplits | None = None,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    record: ModelRecord | None = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``config.model`` (or a prepared ``model``) on ``config.data`` and write a complete run directory.

    Args:
        config: The resolved run configuration (saved as config.yaml). Its ``train`` section drives
            the loop whatever model is trained.
        run_dir: Directory for the run's files; default: a new ``output_dir/run_name``
            (or, when resuming, the directory of the checkpoint).
        resume: A run directory or last.pt to continue exactly where it stopped.
        device: Where to train; default ``runtime.choose_device(config.device)``.
        splits: Already-loaded data (default: ``load_dataset(config.data, config.seed)``).
        callbacks: Called as ``cb(epoch, row)`` after each epoch's checkpoint is written.
        progress: Show a tqdm bar per epoch on stderr.
        model: Train this model (changed in place: moved to ``device``, trained, left holding the best
            epoch's weights) instead of a fresh ``config.model``; QAT and distillation pass a prepared one.
        loss_fn: ``loss_fn(logits, targets)`` or ``loss_fn(logits, targets, images)`` returning the scalar
            training loss; default: cross-entropy with ``config.train.label_smoothing``. Validation
            still reports plain cross-entropy and top-1/top-5.
        record: How to rebuild a passed ``model`` from its checkpoints (stored as ``model_record``);
            default: the registry model of ``config.model`` at the passed model's shapes, else the
            model's own class as factory.
        checkpoint_extra: More entries for every checkpoint of the run (for example a QAT run's
            quantization config), next to the weights.

    Returns:
        The run's paths and metrics, with the best checkpoint's validation and test scores.

    Raises:
        BitsweepError: Unusable config, data or resume checkpoint.
    """
    dev = choose_device(config.device) if device is None else torch.device(device)
    ctx, dev = dist_utils.setup(dev)
    try:
        setup = _Setup(model, loss_fn, record, dict(checkpoint_extra or {}))
        return _fit(config, run_dir, resume, dev, ctx, splits, callbacks, progress, setup)
    finally:
        dist_utils.teardown(ctx)


@dataclass(frozen=True)
class _Setup:
    """What a caller may bring to :func:`fit` besides the config: the model, its loss, its record."""

    model: nn.Module | None
    loss_fn: LossFn | None
    record: ModelRecord | None
    checkpoint_extra: dict[str, Any]


def _passed_model_record(model: nn.Module, config: RunConfig, data: DatasetSplits) -> ModelRecord:
    """The record of a passed model: the config's registry model at the model's shapes, else its own class."""
    geometry: dict[str, Any] = {
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": tuple(data.image_size),
        "mean": tuple(data.mean),
        "std": tuple(data.std),
    }
    try:
        options = {"width": config.model.width, "dropout": config.model.dropout}
        return ModelRecord.of(model, name=config.model.name, options=options, **geometry)
    except (BitsweepError, ValueError, TypeError):
        pass
    try:
        return ModelRecord.of(model, **geometry)
    except (BitsweepError, ValueError, TypeError) as e:
        raise BitsweepError(
            f"cannot describe the passed {type(model).__name__} for its checkpoints ({e}); "
            "pass fit(..., record=ModelRecord(...)) saying how to rebuild it"
        ) from None


def _takes_images(loss_fn: LossFn) -> bool:
    """True when ``loss_fn`` accepts a third positional argument (the batch's images)."""
    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn  # a module's __call__ takes *args
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional for p in params) >= 3


def _fit(
    config: RunConfig,
    run_dir: str | Path | None,
    resume: str | Path | None,
    device: torch.device,
    ctx: dist_utils.DistContext,
    splits: DatasetSplits | None,
    callbacks: Sequence[EpochCallback],
    progress: bool,
    setup: _Setup,
) -> FitResult:
    tc = config.train
    if setup.model is None and config.model.name not in list_models():  # fail before a possibly slow dataset load
        create_model(config.model.name, num_classes=1)
    state = _resume_state(config, resume) if resume is not None else None
    seed_everything(config.seed)
    data = splits if splits is not None else load_dataset(config.data, config.seed)
    if state is not None:
        check_compatible(checkpoint_info(state), state["_path"], num_classes=data.num_classes,
                         in_channels=data.in_channels)  # fmt: skip

    extra = dict(setup.checkpoint_extra)
    if setup.model is None:
        model = create_model(config.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                             width=config.model.width, dropout=config.model.dropout).to(device)  # fmt: skip
    else:
        model = setup.model.to(device)
        record = setup.record or _passed_model_record(model, config, data)
        extra = {"model_record": record.to_dict(), **extra}
    if tc.channels_last:
        model = to_channels_last(model)  # keeps the oneDNN AVX2 strided 1x1 backward bug away (models.common)
    train_loader = TensorLoader(
        data.train, tc.batch_size, mean=data.mean, std=data.std, shuffle=True, augment=config.data.augment,
        drop_last=len(data.train) >= tc.batch_size * ctx.world_size, device=device, seed=config.seed,
        channels_last=tc.channels_last, rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip
    eval_kw: dict[str, Any] = dict(mean=data.mean, std=data.std, device=device, channels_last=tc.channels_last)
    val_loader = TensorLoader(data.val, tc.eval_batch_size, **eval_kw)
    test_loader = TensorLoader(data.test, tc.eval_batch_size, **eval_kw)
    optimizer = build_optimizer(model, tc)
    scheduler = build_schedule(optimizer, tc, len(train_loader))
    criterion: LossFn = setup.loss_fn or nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

    start_epoch, best_top1 = 1, -math.inf
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_top1 = int(state["epoch"]) + 1, float(state["best_top1"])
        restore_rng(state["rng"])
        run_path = Path(run_dir) if run_dir is not None else Path(state["_path"]).parent
    elif ctx.is_main:
        run_path = (
            Path(run_dir)
            if run_dir is not None
            else make_run_dir(config.output_dir, config.run_name, f"{config.data.name}-{config.model.name}")
        )
        run_path.mkdir(parents=True, exist_ok=True)
    else:
        run_path = Path(".")
    run_path = Path(dist_utils.broadcast_str(str(run_path), ctx))
    best_path, last_path = run_path / "best.pt", run_path / "last.pt"

    logger = None
    if ctx.is_main:
        write_text_atomic(run_path / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        write_json_atomic(run_path / "environment.json", {**environment(device), "world_size": ctx.world_size})
        logger = MetricsLogger(run_path, to_dict(config), tensorboard=tc.tensorboard, wandb=tc.wandb,
                               resume_epoch=start_epoch - 1 if state is not None else None)  # fmt: skip

    wrapped: nn.Module = model
    if ctx.distributed:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    train_model: nn.Module | CompiledOrEager = CompiledOrEager(wrapped) if tc.compile else wrapped

    dataset_meta = data.meta()
    base = {"config": to_dict(config), "dataset": dataset_meta, **extra}
    try:
        for epoch in range(start_epoch, tc.epochs + 1):
            row = _train_epoch(train_model, train_loader, optimizer, scheduler, criterion, epoch, tc.epochs,
                               device, tc.amp, ctx, progress)  # fmt: skip
            val = evaluate(model, val_loader, device, tc.amp)
            row.update(val_loss=val.loss, val_top1=val.top1, val_top5=val.top5)
            row["epoch_seconds"] = time.perf_counter() - row.pop("_start")
            # Without a validation split, the latest epoch counts as the best one.
            score = val.top1 if val.images > 0 else float(epoch)
            if ctx.is_main:
                assert logger is not None
                logger.log(row)
                weights = _state_dict(model)
                if score > best_top1:
                    best_top1 = score
                    save_checkpoint(best_path, {**base, "model_state": weights, "epoch": epoch, "metrics": row})
                save_checkpoint(last_path, {
                    **base, "model_state": weights, "epoch": epoch, "metrics": row, "best_top1": best_top1,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng(),
                })  # fmt: skip
            dist_utils.barrier(ctx)
            for callback in callbacks:
                callback(epoch, row)
    finally:
        if logger is not None:
            logger.close()

    best = load_checkpoint(best_path, map_location=device)
    model.load_state_dict(best["model_state"])
    val_result = evaluate(model, val_loader, device, tc.amp)
    test_result = evaluate(model, test_loader, device, tc.amp)
    rows = logger.rows if logger is not None else []
    if ctx.is_main:
        write_json_atomic(run_path / "eval.json", {
            "checkpoint": "best.pt", "epoch": int(best["epoch"]), "val": val_result.to_dict(),
            "test": test_result.to_dict(),
        })  # fmt: skip
        plot_curves(rows, run_path / "curves.png", title=f"{config.model.name} on {data.name}")
    dist_utils.barrier(ctx)
    return FitResult(run_path, best_path, last_path, rows, test_result, val_result)


def _train_epoch(
    model: nn.Module | CompiledOrEager,
    loader: TensorLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: LossFn,
    epoch: int,
    epochs: int,
    device: torch.device,
    amp: bool,
    ctx: dist_utils.DistContext,
    progress: bool,
) -> dict[str, Any]:
    """One pass over the training split; returns the epoch's metrics row (plus its start time)."""
    start = time.perf_counter()
    lr = float(optimizer.param_groups[0]["lr"])
    loader.set_epoch(epoch)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    with_images = _takes_images(criterion)
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, file=sys.stderr,
               disable=not (progress and ctx.is_main), dynamic_ncols=True)  # fmt: skip
    for step, (x, y) in enumerate(bar):
        with autocast(device, amp):
            logits = model(x)
        loss = criterion(logits.float(), y, x) if with_images else criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        seen += int(y.shape[0])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    total_loss, total_correct, total_seen = dist_utils.all_reduce_sum(
        [float(loss_sum.item()), float(correct.item()), float(seen)], ctx, device
    )
    if total_seen == 0:
        raise BitsweepError("the training split is empty; check data.val_size and the dataset files")
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": total_loss / total_seen,
        "train_acc": 100.0 * total_correct / total_seen,
        "train_images_per_s": total_seen / train_seconds,
        "_start": start,
    }
