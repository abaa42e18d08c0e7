"""``bitsweep quantize``: post-training quantization of a trained checkpoint.

Example::

    bitsweep quantize runs/fmnist/best.pt --weight-bits 4 --activation-bits 8 \\
        --override 'features.0*=8,8' --output runs/fmnist/w4a8.pt
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bitsweep.artifacts import load
from bitsweep.artifacts.quantized import quantized_state, save_quantized
from bitsweep.backend.simulate import evaluation_model, runner_for
from bitsweep.cli import common
from bitsweep.config import to_dict
from bitsweep.data import TensorLoader, load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.io import write_json_atomic
from bitsweep.measure.summary import describe_compression
from bitsweep.quant import LayerOverride, QuantConfig, ptq
from bitsweep.runtime import choose_device
from bitsweep.search.layer_bits import layer_names, load_layer_bits
from bitsweep.training import checkpoint_info, evaluate


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``quantize`` command."""
    p = common.add_command(subparsers, "quantize", "quantize a trained checkpoint's weights and activations (PTQ)")
    p.add_argument("checkpoint", help="a bitsweep checkpoint (best.pt / last.pt) or a run directory")
    p.add_argument("--weight-bits", "--weight_quant_bits", dest="weight_bits", type=int, default=8,
                   help="weight bit width, 1..16")  # fmt: skip
    p.add_argument("--activation-bits", "--activation_quant_bits", dest="activation_bits", type=int, default=8,
                   help="activation bit width, 1..16")  # fmt: skip
    p.add_argument("--granularity", default="per_channel", help="weight scales: per_channel or per_tensor")
    common.add_observer_option(p)
    common.add_method_options(p)
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches")
    p.add_argument("--calib-split", default="train", choices=("train", "val"), help="split to calibrate on")
    p.add_argument("--batch-size", type=int, default=256, help="calibration batch size")
    p.add_argument("--eval-batch-size", type=int, default=40,
                   help="evaluation batch size (small batches keep activations in the CPU caches)")  # fmt: skip
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the integer-exact simulation "
                   "(auto: when evaluating >= 5,000 images; same results)")  # fmt: skip
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=W,A",
                   help="per-layer bits by module-name pattern: 'features.0*=8,8' or 'classifier*=skip'")  # fmt: skip
    p.add_argument("--layer-bits", default=None, metavar="FILE",
                   help="per-layer bits from a layer-bits YAML file (written by 'bitsweep search'); it replaces "
                   "--weight-bits/--activation-bits; --granularity, --observer and --method still apply")  # fmt: skip
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm unfolded")
    common.add_scale_dtype_option(p)
    p.add_argument("--output", default=None, help="quantized checkpoint path (default: beside the input)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    common.add_threads_option(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig of the command line; bad values become one-line user errors."""
    try:
        overrides = tuple(LayerOverride.parse(o) for o in args.override)
        return QuantConfig.from_bits(
            args.weight_bits, args.activation_bits, args.granularity, args.observer,
            fold_bn=not args.no_fold_bn, overrides=overrides, method=args.method,
            scale_dtype=args.scale_dtype or "float32",
        )  # fmt: skip
    except ValueError as e:
        raise BitsweepError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Load, calibrate, convert, evaluate FP32 and quantized, write the checkpoint and a JSON record."""
    config = build_config(args)
    common.require_positive("--calib-batches", args.calib_batches)
    common.require_positive("--batch-size", args.batch_size)
    common.require_positive("--eval-batch-size", args.eval_batch_size)
    src_path = Path(args.checkpoint)  # the output folder must be writable before 80 s of work, not after
    out_dir = Path(args.output).parent if args.output else src_path.parent if src_path.is_file() else src_path
    common.check_writable(out_dir, "--output")
    device = choose_device(args.device)
    loaded = load(args.checkpoint, device, expect="float")  # refuses damaged or NaN/inf weights before any work
    model, info, source = loaded.model, checkpoint_info(loaded.meta), loaded.meta
    if args.layer_bits is not None:  # names are checked against the model before any calibration
        config = load_layer_bits(args.layer_bits, layer_names(model, config)).to_quant_config(config)
        if args.scale_dtype is not None:  # given on the command line: wins over the file's
            config = dataclasses.replace(config, scale_dtype=args.scale_dtype)
    label = "mixed" if args.layer_bits is not None else f"W{args.weight_bits}A{args.activation_bits}"
    splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)

    def loader(split: Any, shuffle: bool = False, batch_size: int = args.eval_batch_size) -> TensorLoader:
        return TensorLoader(split, batch_size, mean=info.mean, std=info.std, device=device, shuffle=shuffle)

    calib_set = splits.train if args.calib_split == "train" else splits.val
    if len(calib_set.labels) == 0:
        raise BitsweepError(f"the {args.calib_split} split is empty; calibrate on the other one with --calib-split")
    fp = {name: evaluate(model, loader(s), device=device) for name, s in (("val", splits.val), ("test", splits.test))
          if len(s.labels) > 0}  # fmt: skip
    calib_loader = loader(calib_set, shuffle=True, batch_size=args.batch_size)
    calib = tqdm(calib_loader, total=min(args.calib_batches, len(calib_loader)), desc="calibrate", unit="batch",
                 leave=False)  # fmt: skip
    result = ptq(
        copy.deepcopy(model), config, calib, num_batches=args.calib_batches, options=common.method_options(args)
    )
    qmodel, summary = result.model, result.summary
    # Quantized accuracy from the integer-exact simulation (what an integer deployment computes).
    images = len(splits.val.labels) + len(splits.test.labels)
    runner = runner_for(args.compile, images, args.eval_batch_size)
    example = torch.zeros(1, info.in_channels, *info.image_size, device=device)
    evaluated, simulation = evaluation_model(qmodel, example, runner)
    qres = {name: evaluate(evaluated, loader(s), device=device)
            for name, s in (("val", splits.val), ("test", splits.test)) if len(s.labels) > 0}  # fmt: skip

    print(summary.describe())
    print(f"calibrated on {result.calibration_batches} batches of {args.calib_split} images "
          f"(asked for {args.calib_batches}); method {config.method}")  # fmt: skip
    print(f"quantized accuracy from: {simulation} simulation")
    print(f"{'split':<6} {'fp32 top1':>10} {label:>10}")
    for name in fp:
        print(f"{name:<6} {fp[name].top1:>9.2f}% {qres[name].top1:>9.2f}%")
    src = Path(args.checkpoint)
    stem = src.stem if src.is_file() else "last"
    out = Path(args.output) if args.output else (src.parent if src.is_file() else src) / f"{stem}-{label.lower()}.pt"
    save_quantized(out, quantized_state(qmodel, config, source, summary, loaded.record))
    record = {
        "checkpoint": str(src), "output": str(out), "quant_config": to_dict(config), "summary": summary.to_dict(),
        "fp32": {k: dataclasses.asdict(v) for k, v in fp.items()},
        "quantized": {k: dataclasses.asdict(v) for k, v in qres.items()},
        "simulation": simulation, "calibration_batches": result.calibration_batches,
    }  # fmt: skip
    write_json_atomic(out.with_suffix(".json"), record)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    print(describe_compression(qmodel, config, loaded.record))
    return 0
