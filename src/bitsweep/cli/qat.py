"""``bitsweep qat``: quantization-aware training of a float checkpoint, ending in an integer-exact model.

Example::

    bitsweep qat runs/fmnist/best.pt --weight-bits 2 --activation-bits 4 --epochs 3
    bitsweep qat --resume runs/fmnist/qat-w2a4-lsq-20261205-120000    # after an interruption
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from bitsweep.artifacts import load
from bitsweep.cli import common
from bitsweep.errors import BitsweepError
from bitsweep.measure.summary import describe_compression
from bitsweep.qat import QAT_METHODS, QAT_TRAIN_DEFAULTS, QATConfig, QATResult, qat, resume_qat
from bitsweep.quant import LayerOverride, QuantConfig
from bitsweep.quant.methods import PTQ_METHODS
from bitsweep.search.layer_bits import layer_names, load_layer_bits


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``qat`` command."""
    p = common.add_command(
        subparsers,
        "qat",
        "quantization-aware training: fine-tune a checkpoint with quantization in the loop",
        description="Fine-tune a float checkpoint with its weights and activations fake-quantized (LSQ learned step "
        "sizes or plain STE), distilling from the float model, starting from a post-training result.\n"
        "Writes a run directory (config.yaml, metrics.csv/jsonl, TensorBoard, curves.png, best.pt, last.pt) plus "
        "quantized.pt (the integer-exact quantized checkpoint 'export', 'sweep' and 'report' read) and qat.json.\n"
        "Multi-process: torchrun --nproc_per_node N -m bitsweep qat ...",
    )
    p.add_argument("checkpoint", nargs="?", help="a float checkpoint (best.pt / last.pt) or its run directory")
    p.add_argument("--weight-bits", type=int, default=4, help="weight bit width, 1..16 (1: sign x learned scale)")
    p.add_argument("--activation-bits", type=int, default=8, help="activation bit width, 1..16")
    p.add_argument(
        "--method",
        default="lsq",
        choices=QAT_METHODS,
        help="lsq: learned step sizes (weights per channel, activations); ste: plain straight-through",
    )
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distil from the float model (KL at --temperature plus cross-entropy)",
    )
    p.add_argument("--teacher", default=None, help="float checkpoint to distil from (default: the one trained)")
    p.add_argument("--temperature", type=float, default=QATConfig.temperature, help="distillation temperature")
    p.add_argument(
        "--distill-weight",
        type=float,
        default=QATConfig.distill_weight,
        help="share of the distillation term; the label cross-entropy gets the rest",
    )
    p.add_argument(
        "--init", default="rtn", help=f"PTQ method to start from: {', '.join(PTQ_METHODS)} or a chain such as cle+qdrop"
    )
    p.add_argument("--epochs", type=int, default=QAT_TRAIN_DEFAULTS["epochs"], help="training epochs")
    p.add_argument("--lr", type=float, default=QAT_TRAIN_DEFAULTS["lr"], help="peak learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=QAT_TRAIN_DEFAULTS["weight_decay"], help="weight decay")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the float run's)")
    p.add_argument(
        "--observer",
        default="mse",
        help="initial ranges: minmax, moving_average, percentile or mse, or WEIGHTS/ACTIVATIONS such as mse/minmax "
        "(LSQ then learns them; default: mse)",
    )
    p.add_argument("--granularity", default="per_channel", help="weight scales: per_channel or per_tensor")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=W,A",
        help="per-layer bits by module-name pattern: 'features.0*=8,8' or 'classifier*=skip'",
    )
    p.add_argument(
        "--layer-bits",
        default=None,
        metavar="FILE",
        help="per-layer bits from a layer-bits YAML file (written by 'bitsweep search'); it replaces "
        "--weight-bits/--activation-bits",
    )
    common.add_scale_dtype_option(p)
    p.add_argument("--calib-batches", type=int, default=QATConfig.calib_batches, help="initial calibration batches")
    common.add_method_options(p, prefix="init")
    p.add_argument(
        "--run-dir", default=None, help="run directory (default: qat-w<W>a<A>-<method>-<time> beside the checkpoint)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue an interrupted QAT run exactly (its directory or last.pt); takes no other settings",
    )
    p.add_argument("--eval-batch-size", type=int, default=40, help="batch size of the integer-exact evaluations")
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile the training forward (auto: runs of >= 300 steps; 1-2 min once, then ~2x faster "
        "steps) and the integer-exact simulation (auto: when evaluating >= 5,000 images)",
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the float run's setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_threads_option(p)
    p.set_defaults(func=run)


def _quant_config(args: argparse.Namespace) -> QuantConfig:
    try:
        overrides = tuple(LayerOverride.parse(o) for o in args.override)
        return QuantConfig.from_bits(
            args.weight_bits, args.activation_bits, args.granularity, args.observer, overrides=overrides,
            scale_dtype=args.scale_dtype or "float32",
        )  # fmt: skip
    except ValueError as e:
        raise BitsweepError(str(e)) from None


def _recipe(args: argparse.Namespace) -> QATConfig:
    try:
        return QATConfig(
            method=args.method,
            init=args.init,
            distill=args.distill,
            temperature=args.temperature,
            distill_weight=args.distill_weight,
            calib_batches=args.calib_batches,
        )
    except ValueError as e:
        raise BitsweepError(str(e)) from None


def _report(result: QATResult) -> None:
    if result.quantized is None:  # a non-zero torchrun rank: rank 0 reports
        return
    columns = [k for k in ("float", "start", "final") if k in result.accuracy]
    names = {"float": "fp32", "start": "PTQ start", "final": "QAT"}
    print(f"accuracy of the quantized models from: {result.simulation} simulation")
    print(f"{'split':<6}" + "".join(f"{names[c]:>11}" for c in columns))
    for split in ("val", "test"):
        if all(split in result.accuracy[c] for c in columns):
            print(f"{split:<6}" + "".join(f"{result.accuracy[c][split].top1:>10.2f}%" for c in columns))
    print(f"run directory: {result.run_dir} ({result.seconds:.0f} s)")
    print(f"wrote {result.quantized}")
    loaded = load(result.quantized, "cpu", expect="quantized")
    assert loaded.quant_config is not None
    print(describe_compression(loaded.model, loaded.quant_config, loaded.record))


def run(args: argparse.Namespace) -> int:
    """Check everything, then train, convert, measure and write."""
    kw: dict[str, Any] = {
        "compile_mode": args.compile,
        "eval_batch_size": args.eval_batch_size,
        "progress": not args.quiet,
    }
    common.require_positive("--eval-batch-size", args.eval_batch_size)
    if args.resume is not None:
        if args.checkpoint is not None:
            raise BitsweepError("--resume continues a run with its own settings; drop the checkpoint argument")
        run_path = Path(args.resume)
        common.check_writable(run_path if run_path.is_dir() else run_path.parent, "--resume")
        _report(resume_qat(args.resume, device=args.device, **kw))
        return 0
    if args.checkpoint is None:
        raise BitsweepError("give the float checkpoint to train (or --resume RUN to continue a run)")
    common.require_positive("--epochs", args.epochs)
    common.require_positive("--calib-batches", args.calib_batches)
    if args.batch_size is not None:
        common.require_positive("--batch-size", args.batch_size)
    config, recipe = _quant_config(args), _recipe(args)
    source = Path(args.checkpoint)
    run_dir = Path(args.run_dir) if args.run_dir is not None else None
    common.check_writable(run_dir if run_dir is not None else source if source.is_dir() else source.parent, "--run-dir")
    if args.layer_bits is not None:  # names are checked against the model before any work
        model = load(args.checkpoint, "cpu", expect="float").model
        config = load_layer_bits(args.layer_bits, layer_names(model, config)).to_quant_config(config)
        if args.scale_dtype is not None:  # given on the command line: wins over the file's
            config = dataclasses.replace(config, scale_dtype=args.scale_dtype)
    train: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay}
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    result = qat(
        args.checkpoint,
        config,
        recipe,
        train=train,
        teacher=args.teacher,
        run_dir=run_dir,
        device=args.device,
        init_options=common.method_options(args, prefix="init"),
        **kw,
    )
    _report(result)
    return 0
