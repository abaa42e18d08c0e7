"""``bitsweep quickstart``: the whole job on built-in data in a few minutes, nothing to download.

Trains a small MobileNet-v2 on scikit-learn's 8x8 digits (1,797 images),
evaluates it, sweeps weight x activation bit widths on it (quantize,
calibrate, measure the packed file, evaluate), and writes a report; it prints
where the run directory and report.html are.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsweep.artifacts import load
from bitsweep.backend.simulate import evaluation_model
from bitsweep.cli.common import add_command, add_threads_option, check_writable, require_positive
from bitsweep.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from bitsweep.data import TensorLoader, load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.report import build_report
from bitsweep.sweep.api import format_front, quickstart_sweep
from bitsweep.sweep.pareto import Recommendation
from bitsweep.sweep.stats import DropInterval, drop_interval, paired_drop_interval
from bitsweep.training import EvalResult, fit

QUICKSTART_VAL_IMAGES = 600


def quickstart_config(output_dir: str | Path = "runs", device: str = "auto", seed: int = 0) -> RunConfig:
    """The quickstart recipe (kept identical to configs/quickstart_digits.yaml by a test)."""
    return RunConfig(
        # No augmentation: on 8x8 digits a 1-pixel shift made 15 epochs reach only 88.9 % test
        # (8 epochs without it: 94.2 %), and flips change a digit's meaning.
        # 600 validation images (1 point = 6 images, not 3 as with the default 300); 837 remain for training.
        data=DataConfig(name="digits", val_size=QUICKSTART_VAL_IMAGES,
                        augment=AugmentConfig(crop_padding=0, hflip=False)),
        model=ModelConfig(name="mobilenetv2", width=0.5, dropout=0.1),
        # 30 epochs on 837 images (25 s on one core): 12 reached only 92.2 % test, 30 reach 95.0 %.
        train=TrainConfig(epochs=30, batch_size=64, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          warmup_epochs=1.0, label_smoothing=0.1, eval_batch_size=512),
        seed=seed,
        device=device,
        output_dir=str(output_dir),
        run_name="quickstart-digits-mobilenetv2",
    )  # fmt: skip


@dataclass(frozen=True)
class QuickstartResult:
    """Paths and scores of a quickstart run."""

    run_dir: Path
    checkpoint: Path
    val: EvalResult
    test: EvalResult
    seconds: float


def run_quickstart(
    output_dir: str | Path = "runs",
    *,
    device: str = "auto",
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
) -> QuickstartResult:
    """Train and evaluate the quickstart model; returns where its run directory and best checkpoint are.

    Args:
        output_dir: Parent of the run directory (a fresh ``quickstart-...`` directory is made).
        device: auto, cpu, cuda, ...
        seed: Seed of weights, data order and validation split.
        epochs: Override the recipe's epoch count (tests use 1).
        progress: Show per-epoch progress bars.
    """
    config = quickstart_config(output_dir, device, seed)
    if epochs is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    start = time.perf_counter()
    result = fit(config, progress=progress)
    return QuickstartResult(result.run_dir, result.best_checkpoint, result.val, result.test,
                            time.perf_counter() - start)  # fmt: skip


def val_correct(checkpoint: Path, model_file: Path, batch_size: int = 512) -> tuple[torch.Tensor, float]:
    """Per-image top-1 correctness of ``model_file`` on ``checkpoint``'s validation split, as the sweep measures it.

    A float checkpoint runs as is; a packed file runs through the integer-exact
    simulation (like the sweep's cells). Returns (correct as bool, top-1 %).
    """
    source = load(checkpoint)
    data = source.data
    if data is None:
        raise BitsweepError(f"'{checkpoint}' does not record its dataset; cannot rebuild its validation split")
    splits = load_dataset(dataclasses.replace(data, download=False), seed=source.seed)
    loader = TensorLoader(splits.val, batch_size, mean=splits.mean, std=splits.std)
    loaded = source if model_file == checkpoint else load(model_file)
    model: torch.nn.Module = loaded.model
    hits = []
    with torch.no_grad():
        for x, y in loader:
            if loaded.kind != "float" and model is loaded.model:
                model = evaluation_model(loaded.model, x[:1])[0]
            hits.append(model(x).argmax(1) == y)
    correct = torch.cat(hits)
    return correct, 100.0 * int(correct.sum()) / max(1, correct.numel())


def drop_of(row: Mapping[str, Any], baseline_val_top1: float, images: int, checkpoint: Path,
            packed_dir: Path) -> DropInterval:  # fmt: skip
    """The validation drop of a sweep row with its 95 % interval: paired when the cell's packed file is there.

    The paired bootstrap (:func:`~bitsweep.sweep.stats.paired_drop_interval`)
    uses which images each model gets right, so it is as narrow as the data
    allow. Without the packed file, or when the re-measured accuracies do not
    match the sweep's, it falls back to the wider unpaired interval from the
    two accuracies (:func:`~bitsweep.sweep.stats.drop_interval`).
    """
    packed = packed_dir / f"{row.get('cell_id')}.safetensors"
    if packed.is_file():
        base, base_top1 = val_correct(checkpoint, checkpoint)
        cell, cell_top1 = val_correct(checkpoint, packed)
        if abs(base_top1 - baseline_val_top1) < 1e-6 and abs(cell_top1 - float(row["val_top1"])) < 1e-6:
            return paired_drop_interval(base.numpy(), cell.numpy())
    return drop_interval(images, baseline_val_top1, float(row["val_top1"]))


def noise_lines(front: Sequence[Mapping[str, Any]], recommendation: Recommendation, images: int,
                checkpoint: Path, packed_dir: Path) -> list[str]:  # fmt: skip
    """The recommendation's drop (or, with none, the nearest miss's) with a 95 % interval and what it means."""
    base, budget = recommendation.baseline_val_top1, recommendation.max_drop
    row = recommendation.row
    if row is None:
        quantized = [r for r in front if r.get("weight_bits") is not None or r.get("activation_bits") is not None]
        if not quantized:
            return []
        row = min(quantized, key=lambda r: base - float(r["val_top1"]))
    interval = drop_of(row, base, images, checkpoint, packed_dir)
    label = row.get("label", row.get("cell_id"))
    lines = [f"{label} vs FP32 on the validation split: {interval.describe()} ({interval.method}); "
             f"{interval.verdict(budget)}"]  # fmt: skip
    if recommendation.row is None and interval.low <= budget:
        lines.append(f"so keeping FP32 is not clearly better: {label} may well stay within {budget:g} point(s); "
                     "check it on more images (bitsweep eval) before deciding")  # fmt: skip
    elif recommendation.row is not None and interval.high > budget:
        lines.append(f"{label} is within the budget as measured, but the interval reaches past it: "
                     "confirm on more images before relying on it")  # fmt: skip
    return lines


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``quickstart`` command."""
    p = add_command(
        subparsers,
        "quickstart",
        help="train a small MobileNet-v2 on built-in digits, sweep its bit widths, write a report "
        "(no download, a few minutes on a CPU)",
    )
    p.add_argument("--output-dir", default="runs", help="parent of the run directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and validation split")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's 30 epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-sweep", action="store_true", help="stop after training (skip the bit-width sweep and report)")
    add_threads_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the quickstart and print where its files are."""
    if args.epochs is not None:
        require_positive("--epochs", args.epochs)
    check_writable(args.output_dir, "--output-dir")
    result = run_quickstart(args.output_dir, device=args.device, seed=args.seed, epochs=args.epochs,
                            progress=not args.quiet)  # fmt: skip
    print(f"trained mobilenetv2 (width 0.5) on digits in {result.seconds:.0f} s")
    print(f"validation top-1 {result.val.top1:.2f} %, test top-1 {result.test.top1:.2f} %")
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    if args.no_sweep:
        print(f"next: bitsweep sweep {result.checkpoint}")
        return 0
    outcome = quickstart_sweep(result.checkpoint, result.run_dir, progress=not args.quiet)
    print("\nPareto front of the bit-width sweep (packed size vs validation top-1):")
    print(format_front(outcome.front))
    if outcome.recommendation is not None:
        print(f"recommended: {outcome.recommendation.summary()}")
        for line in noise_lines(outcome.front, outcome.recommendation, result.val.images, result.checkpoint,
                                result.run_dir / "sweep" / "packed"):  # fmt: skip
            print(line)
    print(f"report: {build_report(outcome.run.results).html}")
    return 0
