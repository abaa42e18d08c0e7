"""``bitsweep train``: train a model from a recipe, with flags and ``--set`` overrides on top."""

from __future__ import annotations

import argparse
from argparse import SUPPRESS
from pathlib import Path

from bitsweep.cli.common import add_command, add_threads_option, check_writable
from bitsweep.config import RunConfig, apply_overrides, from_dict, load_yaml, set_dotted
from bitsweep.training import fit, load_checkpoint


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train`` command."""
    p = add_command(
        subparsers,
        "train",
        help="train a model and write a run directory",
        description="Train a model from a YAML recipe (configs/*.yaml) plus command-line overrides.\n"
        "Writes config.yaml, metrics.csv/jsonl, best.pt, last.pt, curves.png and eval.json to the run directory.\n"
        "Flags without a default shown take the recipe's value; explicit flags win over --set.\n"
        "Multi-GPU or multi-process: torchrun --nproc_per_node N -m bitsweep train ...",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        default=SUPPRESS,
        help="recipe file; default: built-in defaults (or the resumed run's config)",
    )
    p.add_argument("--epochs", type=int, default=SUPPRESS, help="train.epochs")
    p.add_argument("--batch-size", type=int, default=SUPPRESS, help="train.batch_size (per process)")
    p.add_argument("--lr", type=float, default=SUPPRESS, help="train.lr, the peak learning rate")
    p.add_argument("--model", default=SUPPRESS, help="model.name: mobilenetv2, resnet20, vgg16")
    p.add_argument("--width", type=float, default=SUPPRESS, help="model.width, the channel multiplier")
    p.add_argument("--dataset", default=SUPPRESS, help="data.name: cifar10, cifar100, fashion_mnist, digits, synthetic")
    p.add_argument("--data-dir", default=SUPPRESS, help="data.data_dir, where the dataset files are")
    p.add_argument("--device", default=SUPPRESS, help="device: auto, cpu, cuda, cuda:N, mps")
    p.add_argument(
        "--seed", type=int, default=SUPPRESS, help="seed (weights, data order, augmentation, validation split)"
    )
    p.add_argument("--output-dir", default=SUPPRESS, help="output_dir, the parent of run directories")
    p.add_argument("--run-name", default=SUPPRESS, help="run_name; default <dataset>-<model>-<timestamp>")
    p.add_argument(
        "--resume", metavar="PATH", default=SUPPRESS, help="continue a run exactly: its directory or its last.pt"
    )
    p.add_argument("--compile", action="store_true", default=SUPPRESS, help="train.compile: torch.compile the model")
    p.add_argument("--wandb", action="store_true", default=SUPPRESS, help="train.wandb: log to W&B (offline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config value, e.g. --set train.label_smoothing=0 --set data.augment.cutout=8")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_option(p)
    p.set_defaults(func=run)


# Flag -> config key; a flag the user did not give leaves the recipe's value alone.
_FLAGS: tuple[tuple[str, str], ...] = (
    ("epochs", "train.epochs"),
    ("batch_size", "train.batch_size"),
    ("lr", "train.lr"),
    ("model", "model.name"),
    ("width", "model.width"),
    ("dataset", "data.name"),
    ("data_dir", "data.data_dir"),
    ("device", "device"),
    ("seed", "seed"),
    ("output_dir", "output_dir"),
    ("run_name", "run_name"),
    ("compile", "train.compile"),
    ("wandb", "train.wandb"),
)


def build_config(args: argparse.Namespace) -> RunConfig:
    """The resolved run config: recipe (or the resumed run's config), then ``--set``, then flags."""
    config_path, resume = getattr(args, "config", None), getattr(args, "resume", None)
    if config_path is not None:
        data = load_yaml(config_path)
    elif resume is not None:
        path = Path(resume)
        data = load_checkpoint(path / "last.pt" if path.is_dir() else path)["config"]
    else:
        data = {}
    data = apply_overrides(data, list(args.overrides))
    for attr, dotted in _FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            set_dotted(data, dotted, value)
    return from_dict(RunConfig, data)


def run(args: argparse.Namespace) -> int:
    """Train, then print the run directory and the best checkpoint's accuracies."""
    config = build_config(args)
    resume = getattr(args, "resume", None)
    if resume is not None:
        check_writable(resume if Path(resume).is_dir() else Path(resume).parent, "--resume")
    else:
        check_writable(config.output_dir, "--output-dir")
    result = fit(config, resume=getattr(args, "resume", None), progress=not args.quiet)
    if not result.metrics:  # a non-zero torchrun rank: rank 0 reports
        return 0
    best = max(result.metrics, key=lambda r: r["val_top1"] if r["val_top1"] == r["val_top1"] else -1.0)
    print(f"run directory: {result.run_dir}")
    print(f"best epoch {best['epoch']}/{config.train.epochs}: "
          f"val top-1 {result.val.top1:.2f} %, test top-1 {result.test.top1:.2f} %, "
          f"test top-5 {result.test.top5:.2f} %, test loss {result.test.loss:.4f}")  # fmt: skip
    return 0
