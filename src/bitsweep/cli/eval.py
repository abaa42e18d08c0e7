"""``bitsweep eval``: top-1, top-5, loss and throughput of a checkpoint on its validation and test splits."""

from __future__ import annotations

import argparse
import dataclasses
import json
from argparse import SUPPRESS
from pathlib import Path
from typing import Any

import torch

from bitsweep.cli.common import add_command, add_threads_option, require_positive
from bitsweep.data import TensorLoader, load_dataset
from bitsweep.runtime import choose_device
from bitsweep.training import check_compatible, evaluate, load_model


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``eval`` command."""
    p = add_command(
        subparsers,
        "eval",
        help="evaluate a checkpoint on its validation and test splits",
        description="Evaluate a checkpoint (a best.pt/last.pt file or a run directory) on the validation split it\n"
        "was trained with (same seed, same held-out images) and on the test split.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="best.pt / last.pt, or a run directory (its best.pt)")
    p.add_argument("--data-dir", default=SUPPRESS, help="where the dataset files are (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    add_threads_option(p)
    p.add_argument("--batch-size", type=int, default=1024, help="images per evaluation batch")
    p.add_argument("--model", default=SUPPRESS, help="fail unless the checkpoint holds this architecture")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=run)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 1024,
    data_dir: str | None = None,
    expect_model: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on its validation and test splits; returns a JSON-ready dict.

    The model comes through :func:`bitsweep.artifacts.load` (via ``load_model``), which refuses a
    damaged checkpoint, NaN/inf weights included, before any image is evaluated.
    """
    path = Path(checkpoint)
    dev = choose_device(device)
    model, info = load_model(path, dev, expect_model=expect_model)
    data_config = info.data if data_dir is None else dataclasses.replace(info.data, data_dir=data_dir)
    splits = load_dataset(data_config, seed=info.seed)  # same seed -> the same held-out validation images
    check_compatible(info, path, num_classes=splits.num_classes, in_channels=splits.in_channels)
    channels_last = info.config.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs
    results: dict[str, Any] = {"checkpoint": str(path), "model": info.model.name, "dataset": info.data.name,
                               "epoch": info.epoch}  # fmt: skip
    for split in ("val", "test"):
        loader = TensorLoader(getattr(splits, split), batch_size, mean=info.mean, std=info.std, device=dev,
                              channels_last=channels_last)  # fmt: skip
        results[split] = evaluate(model, loader, dev, amp=info.config.train.amp).to_dict()
    return results


def _table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['model']} on {results['dataset']}, epoch {results['epoch']} ({results['checkpoint']})",
        f"{'split':<6} {'images':>7} {'top-1 %':>8} {'top-5 %':>8} {'loss':>8} {'images/s':>10}",
    ]
    for split in ("val", "test"):
        r = results[split]
        lines.append(f"{split:<6} {r['images']:>7d} {r['top1']:>8.2f} {r['top5']:>8.2f} {r['loss']:>8.4f} "
                     f"{r['images_per_s']:>10.0f}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the evaluation table (or JSON)."""
    require_positive("--batch-size", args.batch_size)
    results = evaluate_checkpoint(
        args.checkpoint,
        device=args.device,
        batch_size=args.batch_size,
        data_dir=getattr(args, "data_dir", None),
        expect_model=getattr(args, "model", None),
    )
    print(json.dumps(results, indent=2) if args.json else _table(results))
    return 0
