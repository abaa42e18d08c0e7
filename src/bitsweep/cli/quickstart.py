"""``bitsweep quickstart``: the whole job on built-in data in a few minutes, nothing to download.

Trains a small MobileNet-v2 on scikit-learn's 8x8 digits (1,797 images),
evaluates it, sweeps weight x activation bit widths on it (quantize,
calibrate, measure the packed file, evaluate), and writes a report; it prints
where the run directory and report.html are.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bitsweep.cli.common import add_command

if TYPE_CHECKING:
    from bitsweep.config import RunConfig
    from bitsweep.training import EvalResult


def quickstart_config(output_dir: str | Path = "runs", device: str = "auto", seed: int = 0) -> RunConfig:
    """The quickstart recipe (kept identical to configs/quickstart_digits.yaml by a test)."""
    from bitsweep.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        # No augmentation: on 8x8 digits a 1-pixel shift made 15 epochs reach only 88.9 % test
        # (8 epochs without it: 94.2 %), and flips change a digit's meaning.
        data=DataConfig(name="digits", augment=AugmentConfig(crop_padding=0, hflip=False)),
        model=ModelConfig(name="mobilenetv2", width=0.5, dropout=0.1),
        train=TrainConfig(epochs=12, batch_size=64, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          warmup_epochs=1.0, label_smoothing=0.1, eval_batch_size=512),  # fmt: skip
        seed=seed,
        device=device,
        output_dir=str(output_dir),
        run_name="quickstart-digits-mobilenetv2",
    )


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
    import dataclasses

    from bitsweep.training import fit

    config = quickstart_config(output_dir, device, seed)
    if epochs is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    start = time.perf_counter()
    result = fit(config, progress=progress)
    return QuickstartResult(result.run_dir, result.best_checkpoint, result.val, result.test,
                            time.perf_counter() - start)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's 12 epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-sweep", action="store_true", help="stop after training (skip the bit-width sweep and report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the quickstart and print where its files are."""
    from bitsweep.cli.common import require_positive

    if args.epochs is not None:
        require_positive("--epochs", args.epochs)
    result = run_quickstart(args.output_dir, device=args.device, seed=args.seed, epochs=args.epochs,
                            progress=not args.quiet)  # fmt: skip
    print(f"trained mobilenetv2 (width 0.5) on digits in {result.seconds:.0f} s")
    print(f"validation top-1 {result.val.top1:.2f} %, test top-1 {result.test.top1:.2f} %")
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    if args.no_sweep:
        print(f"next: bitsweep sweep {result.checkpoint}")
        return 0
    from bitsweep.sweep.api import format_front, quickstart_sweep

    outcome = quickstart_sweep(result.checkpoint, result.run_dir, progress=not args.quiet)
    print("\nPareto front of the bit-width sweep (packed size vs validation top-1):")
    print(format_front(outcome.front))
    if outcome.recommendation is not None:
        print(f"recommended: {outcome.recommendation.summary()}")
    print(f"report: {outcome.report_html}")
    return 0
