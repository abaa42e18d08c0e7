"""``bitsweep search CHECKPOINT``: per-layer weight bits for the smallest file within a budget, checked integer-exact.

Example::

    bitsweep search runs/fmnist/best.pt --max-drop 1 --weight-bits 2,3,4,5,6,8
    bitsweep search runs/fmnist/best.pt --max-ratio 10 --output-dir runs/fmnist/search-10x
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any

from bitsweep.artifacts import Loaded, load
from bitsweep.artifacts.packed import PackedMeta, save_packed
from bitsweep.backend.simulate import runner_for
from bitsweep.cli import common
from bitsweep.config import to_dict
from bitsweep.data import load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.io import write_json_atomic
from bitsweep.qat import QATConfig, qat
from bitsweep.quant import QuantConfig
from bitsweep.runtime import choose_device
from bitsweep.search.hessian import (
    HessianConfig,
    HessianSensitivity,
    hessian_sensitivity,
    load_cached_traces,
    rank_agreement,
)
from bitsweep.search.layer_bits import save_layer_bits
from bitsweep.search.sensitivity import Sensitivity
from bitsweep.search.validate import ValidatedPlan, load_cached_sensitivity, search_validated
from bitsweep.sweep.evaluate import file_sha256, normalize
from bitsweep.training import checkpoint_info

OUTPUTS = ("layer_bits.yaml", "model.safetensors", "sensitivity.json", "search.json")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``search`` command."""
    p = common.add_command(
        subparsers,
        "search",
        help="choose per-layer weight bits: the smallest packed file within a size or accuracy budget",
        description="Measure how much each layer's accuracy suffers at each candidate weight bit width (cached in "
        "OUTPUT/sensitivity.json; or, with --sensitivity hessian, estimate it from Hessian traces in "
        "OUTPUT/hessian.json), solve exactly for per-layer bits under one budget, quantize the chosen plan and "
        "check it with the integer-exact evaluation on the validation images. Under --max-drop a plan that misses "
        "the budget is re-solved with a tighter one (at most --max-rounds solves). Writes layer_bits.yaml (for "
        "'bitsweep quantize --layer-bits'), model.safetensors (the packed file), sensitivity.json and search.json.\n\n"
        "example: bitsweep search runs/fm/best.pt --max-drop 1",
    )
    p.add_argument("checkpoint", help="a float bitsweep checkpoint (best.pt) or run directory")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-mb", type=float, default=None, metavar="MB",
                        help="packed file at most MB megabytes (10^6 bytes)")  # fmt: skip
    budget.add_argument("--max-ratio", type=float, default=None, metavar="R",
                        help="packed file at least R times smaller than the FP32 file")  # fmt: skip
    budget.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                        help="measured validation top-1 at most POINTS below FP32")  # fmt: skip
    p.add_argument("--weight-bits", type=common.bit_list, default=[2, 3, 4, 5, 6, 8],
                   help="candidate weight bit widths, 1..16")  # fmt: skip
    p.add_argument("--activation-bits", type=common.bit_list, default=[8],
                   help="bits of every activation site, 1..16; several (e.g. 4,8): chosen per site, measured one "
                   "site at a time")  # fmt: skip
    p.add_argument("--max-activation-kb", type=float, default=None, metavar="KB",
                   help="peak activation memory: no quantized activation tensor of one image may take more than "
                   "KB*1000 bytes (options over it are removed before solving)")  # fmt: skip
    p.add_argument("--sensitivity", choices=("measured", "hessian"), default="measured",
                   help="what ranks the layers: measured single-layer drops (cached in OUTPUT/sensitivity.json), or "
                   "hessian: Hutchinson traces of the loss Hessian times the rounding noise (HAWQ-V2, cached in "
                   "OUTPUT/hessian.json; size budgets and one activation bit width only)")  # fmt: skip
    p.add_argument("--hessian-samples", type=int, default=None, metavar="N",
                   help=f"Rademacher vectors per trace with --sensitivity hessian (default "
                   f"{HessianConfig.samples})")  # fmt: skip
    p.add_argument("--hessian-images", type=int, default=None, metavar="N",
                   help="validation images of the Hessian loss with --sensitivity hessian (default "
                   f"{HessianConfig.images}, at most --val-images)")  # fmt: skip
    p.add_argument("--granularity", default="per_channel", help="weight scales: per_channel or per_tensor")
    common.add_observer_option(p)
    common.add_scale_dtype_option(p, default="float16")  # the search's job is the smallest file
    common.add_method_options(p)
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches of training images")
    p.add_argument("--calib-batch-size", type=int, default=256, help="images per calibration batch")
    p.add_argument("--val-images", type=int, default=None, metavar="N",
                   help="use the first N validation images for sensitivity and checks (default: all)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=40, help="evaluation batch size")
    p.add_argument("--max-rounds", type=int, default=3, help="solves at most under --max-drop (1: no retry)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the integer-exact simulation (auto: when evaluating >= 5,000 images)")  # fmt: skip
    p.add_argument("--finetune", choices=("none", "qat"), default="none",
                   help="qat: fine-tune the chosen plan with quantization-aware training (LSQ + distillation, "
                   "ranges from the MSE observer) into OUTPUT/qat, packed as OUTPUT/qat/model.safetensors")  # fmt: skip
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs of --finetune qat")
    p.add_argument("--output-dir", default=None, help="where the four files go (default: CHECKPOINT's folder/search)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_threads_option(p)
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """Refuse bad numbers in one line before any work."""
    for name, value in (("--max-mb", args.max_mb), ("--max-ratio", args.max_ratio)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise BitsweepError(f"{name} must be a positive number, got {value:g}")
    if args.max_drop is not None and not (args.max_drop >= 0 and math.isfinite(args.max_drop)):
        raise BitsweepError(f"--max-drop must be a number of points >= 0, got {args.max_drop:g}")
    if args.max_mb is not None and args.max_mb * 1e6 < 1:
        raise BitsweepError(f"--max-mb {args.max_mb:g} is less than one byte; give megabytes (10^6 bytes)")
    kb = args.max_activation_kb
    if kb is not None and not (kb * 1000 >= 1 and math.isfinite(kb)):
        raise BitsweepError(f"--max-activation-kb must be at least 0.001 (one byte), got {kb:g}")
    for name in ("calib_batches", "calib_batch_size", "batch_size", "max_rounds"):
        common.require_positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.val_images is not None:
        common.require_positive("--val-images", args.val_images)
    _check_sensitivity(args)
    common.require_positive("--epochs", args.epochs)


def _check_sensitivity(args: argparse.Namespace) -> None:
    """Refuse what the chosen sensitivity does not support, in one line."""
    given = [f for f, v in (("--hessian-samples", args.hessian_samples), ("--hessian-images", args.hessian_images))
             if v is not None]  # fmt: skip
    if args.sensitivity == "measured":
        if given:
            raise BitsweepError(f"{given[0]} applies to --sensitivity hessian only; add it or leave {given[0]} out")
        return
    if args.max_drop is not None:
        raise BitsweepError("--sensitivity hessian estimates a loss increase, not accuracy points, so it cannot "
                            "meet --max-drop: give --max-mb or --max-ratio, or use --sensitivity measured with "
                            "--max-drop")  # fmt: skip
    if len(set(args.activation_bits)) > 1:
        raise BitsweepError("--sensitivity hessian covers weight layers only: give one --activation-bits, or use "
                            "--sensitivity measured to search activation bits")  # fmt: skip
    if args.hessian_images is not None:
        common.require_positive("--hessian-images", args.hessian_images)
    if args.hessian_samples is not None and args.hessian_samples < 2:
        raise BitsweepError(f"--hessian-samples must be at least 2 (a standard error needs two), got "
                            f"{args.hessian_samples}")  # fmt: skip


def compact_bits(result: ValidatedPlan) -> str:
    """One line per bit width: how many layers, their share of the integer bytes, and names when few."""
    bits = {name: result.plan.weight_bits_of(name) for name in result.plan.weights}
    counts = Counter(bits.values())
    lines = []
    for b in sorted(counts, reverse=True):
        names = [n for n, v in bits.items() if v == b]
        shown = ", ".join(names) if len(names) <= 4 else ", ".join(names[:3]) + f", ... ({len(names) - 3} more)"
        lines.append(f"  {b:>2} bits: {counts[b]:>3} layer(s): {shown}")
    return "\n".join(lines)


def compact_activation_bits(result: ValidatedPlan) -> str:
    """One line per activation bit width: how many sites, and their names when few."""
    counts = Counter(result.activation_bits.values())
    lines = []
    for b in sorted(counts, reverse=True):
        names = [n for n, v in result.activation_bits.items() if v == b]
        shown = ", ".join(names) if len(names) <= 4 else ", ".join(names[:3]) + f", ... ({len(names) - 3} more)"
        lines.append(f"  {b:>2} bits: {counts[b]:>3} site(s): {shown}")
    return "\n".join(lines)


def summary(result: ValidatedPlan, activations: bool = False) -> str:
    """The printed summary: bits, sizes (predicted equals real), ratio, accuracies, rounds, notes.

    With ``activations`` (activation bits searched or an activation-memory budget), also the sites per
    activation bit width and the peak activation memory.
    """
    lines = ["chosen weight bits per layer (all names in layer_bits.yaml):", compact_bits(result)]
    if activations:
        lines += ["activation bits per site:", compact_activation_bits(result)]
        limit = "" if result.max_activation_bytes is None else f" (budget {result.max_activation_bytes:,} bytes)"
        lines.append(f"peak activation memory: {result.peak_activation_bytes:,} bytes per image at "
                     f"'{result.peak_activation_site}'{limit}")  # fmt: skip
    same = "equal" if result.predicted_bytes == result.file_bytes else "DIFFERENT (a bug: please report it)"
    lines.append(f"packed file: {result.file_bytes:,} bytes (predicted {result.predicted_bytes:,}: {same}); "
                 f"FP32 {result.fp32_bytes:,} bytes; {result.ratio:.2f}x smaller")  # fmt: skip
    budget = (f"max {result.max_bytes:,} bytes" if result.max_drop is None
              else f"max drop {result.max_drop:g} points")  # fmt: skip
    met = "met" if result.met else "NOT MET"
    lines.append(f"validation top-1 {result.val_top1:.2f} % (FP32 {result.fp32_val_top1:.2f} %, drop "
                 f"{result.val_drop:.2f}; {budget}: {met}; {result.simulation})")  # fmt: skip
    if result.test_top1 is not None and result.fp32_test_top1 is not None:
        drop = result.fp32_test_top1 - result.test_top1
        lines.append(f"test top-1 {result.test_top1:.2f} % (FP32 {result.fp32_test_top1:.2f} %, drop {drop:.2f}; "
                     "reported only, never used to choose)")  # fmt: skip
    predicted = (f"loss increase (Hessian estimate) of the final plan {result.rounds[-1].predicted_drop:.4g}"
                 if isinstance(result.sensitivity, HessianSensitivity)
                 else f"drop of the final plan {result.rounds[-1].predicted_drop:.2f}")  # fmt: skip
    lines.append(f"rounds: {len(result.rounds)} (predicted summed {predicted})")
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check inputs, load the checkpoint and data, search and validate, write the four files, print a summary."""
    _check(args)
    try:
        base = QuantConfig.from_bits(8, max(args.activation_bits), args.granularity, args.observer, method=args.method,
                                     scale_dtype=args.scale_dtype)  # fmt: skip
    except ValueError as e:
        raise BitsweepError(str(e)) from None
    options = common.method_options(args)
    src = Path(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else (src.parent if src.is_file() else src) / "search"
    common.check_writable(out_dir, "--output-dir")  # before minutes of work, not after
    if args.finetune == "qat" and (out_dir / "qat").exists():
        raise BitsweepError(f"{out_dir / 'qat'} holds an earlier fine-tuning; move it away or choose another "
                            "--output-dir (an interrupted one continues with 'bitsweep qat --resume')")  # fmt: skip
    device = choose_device(args.device)
    loaded = load(args.checkpoint, device, expect="float")
    info = checkpoint_info(loaded.meta)
    data = dataclasses.replace(info.data, download=False)
    splits = load_dataset(data, seed=info.seed)
    val_set = splits.val if args.val_images is None else splits.val.subset(slice(0, args.val_images))
    if len(val_set.labels) == 0:
        raise BitsweepError("the validation split is empty; the search needs validation images to measure on")
    val = (normalize(val_set.images, info.mean, info.std, device), val_set.labels.to(device))
    test = (normalize(splits.test.images, info.mean, info.std, device), splits.test.labels.to(device))
    n = args.calib_batches * args.calib_batch_size
    calib = normalize(splits.train.images[:n], info.mean, info.std, device)
    if calib.shape[0] == 0:
        raise BitsweepError("the training split is empty, so there is nothing to calibrate on")
    batches = [calib[i : i + args.calib_batch_size] for i in range(0, calib.shape[0], args.calib_batch_size)]
    bits = sorted(args.weight_bits)
    key = {
        "checkpoint_sha256": file_sha256(loaded.path), "weight_bits": bits, "val_images": len(val_set.labels),
        "data": dataclasses.asdict(data), "seed": info.seed, "weight": to_dict(base.weight),
        "weight_observer": base.weight_observer, "fold_bn": base.fold_bn, "scale_dtype": base.scale_dtype,
    }  # fmt: skip
    act_bits = sorted(set(args.activation_bits))
    if len(act_bits) > 1:  # activation trials: a key without these (an older cache) is measured again
        key.update({"activation_bits": act_bits, "activation": to_dict(base.activation),
                    "activation_observer": base.activation_observer, "calib_batches": args.calib_batches,
                    "calib_batch_size": args.calib_batch_size})  # fmt: skip
    max_act = None if args.max_activation_kb is None else math.floor(args.max_activation_kb * 1000)
    hess = HessianConfig(args.hessian_samples or HessianConfig.samples, args.hessian_images or HessianConfig.images)
    hessian_key = {"checkpoint_sha256": key["checkpoint_sha256"], "data": key["data"], "seed": info.seed,
                   "fold_bn": base.fold_bn, "images": min(hess.images, len(val_set.labels)),
                   "samples": hess.samples, "hessian_seed": hess.seed}  # fmt: skip
    measured_cache, hessian_cache = (out_dir / "sensitivity.json", key), (out_dir / "hessian.json", hessian_key)
    cached = load_cached_sensitivity(*measured_cache)
    # beside a measured run, any traces of the same model and images are worth recording
    same_model = None if args.sensitivity == "hessian" else ("checkpoint_sha256", "data", "seed", "fold_bn")
    cached_traces = load_cached_traces(*hessian_cache, match=same_model)
    cache = hessian_cache if args.sensitivity == "hessian" else measured_cache
    images = len(val_set.labels) * args.max_rounds + len(splits.test.labels)
    result = search_validated(
        loaded.model, batches, val, test if len(splits.test.labels) else None, record=loaded.record,
        max_bytes=None if args.max_mb is None else math.floor(args.max_mb * 1e6), max_ratio=args.max_ratio,
        max_drop=args.max_drop, weight_bits=bits, activation_bits=act_bits, max_activation_bytes=max_act, base=base,
        extra=loaded.source_meta(), sensitivity=cached if args.sensitivity == "measured" else None,
        sensitivity_cache=cache, estimate=args.sensitivity, hessian=hess, method_options=options,
        max_rounds=args.max_rounds, batch_size=args.batch_size,
        runner=runner_for(args.compile, images, args.batch_size), packed_path=out_dir / "model.safetensors",
        progress=not args.quiet,
    )  # fmt: skip
    # The file carries the scale dtype: 'quantize/qat --layer-bits' then make the file the search measured.
    save_layer_bits(dataclasses.replace(result.plan, scale_dtype=base.scale_dtype), out_dir / "layer_bits.yaml")
    record = {"checkpoint": str(loaded.path), "weight_bits": bits,
              "activation_bits": act_bits[0] if len(act_bits) == 1 else act_bits,
              "max_activation_kb": args.max_activation_kb, "max_ratio": args.max_ratio,
              "val_images": len(val_set.labels), "test_images": len(splits.test.labels),
              "scale_dtype": base.scale_dtype, **result.to_dict()}  # fmt: skip
    measured = result.sensitivity if isinstance(result.sensitivity, Sensitivity) else cached
    hessian = result.sensitivity if isinstance(result.sensitivity, HessianSensitivity) else None
    if hessian is None and cached_traces is not None:
        hessian = hessian_sensitivity(loaded.model, cached_traces, bits, base=base)
    record.update(both_estimates(result, measured, hessian, measured_cache[0]))
    write_json_atomic(out_dir / "search.json", record)
    if isinstance(result.sensitivity, Sensitivity):
        trials = len(result.sensitivity.trials) + len(result.sensitivity.activation_trials)
        how = "reused the cache" if cached is not None else f"measured {trials} trials"
    else:
        how = ("reused the cache" if cached_traces is not None
               else f"estimated Hessian traces, {hess.samples} samples")  # fmt: skip
    print(f"sensitivity: {how} ({result.sensitivity.images} validation images, {cache[0]})")
    print(summary(result, len(act_bits) > 1 or max_act is not None))
    print(f"wrote {', '.join(cache[0].name if f == 'sensitivity.json' else f for f in OUTPUTS)} in {out_dir}")
    if args.finetune == "qat":
        tuned = finetune(args, loaded, result.plan.to_quant_config(base), out_dir)
        write_json_atomic(out_dir / "search.json", {**record, "finetune": tuned})
        print(f"after {args.epochs} QAT epoch(s): validation top-1 {tuned['val_top1']:.2f} %, test top-1 "
              f"{tuned['test_top1']:.2f} % ({tuned['simulation']}); packed file {tuned['file_bytes']:,} bytes, "
              f"{result.fp32_bytes / tuned['file_bytes']:.2f}x smaller; run {tuned['run_dir']}")  # fmt: skip
    return 0


def both_estimates(
    result: ValidatedPlan, measured: Sensitivity | None, hessian: HessianSensitivity | None, measured_path: Path
) -> dict[str, Any]:
    """What ``search.json`` adds about the estimate the solver did not use, when its cache was there.

    The Hessian record (traces and estimates) is already in the result when the solver used it; a
    measured cache is named by its file (its trials stay there). With both, their Spearman rank
    agreement per bit width (``rank_agreement``: loss and top-1 drops against the Hessian estimate).
    """
    out: dict[str, Any] = {}
    if hessian is not None and not isinstance(result.sensitivity, HessianSensitivity):
        out["hessian"] = hessian.to_dict()
    if measured is not None and not isinstance(result.sensitivity, Sensitivity):
        out["measured_sensitivity"] = str(measured_path)
    if measured is not None and hessian is not None:
        out["rank_agreement"] = {m: rank_agreement(measured.drops(m), hessian.drops()) for m in ("loss", "top1")}
    return out


def finetune(args: argparse.Namespace, loaded: Loaded, config: QuantConfig, out_dir: Path) -> dict[str, Any]:
    """QAT of the chosen plan (ranges re-picked by the MSE observer), its packed file, and what it measured."""
    config = dataclasses.replace(config, weight_observer="mse", activation_observer="mse")
    run = out_dir / "qat"
    if run.exists():
        raise BitsweepError(
            f"{run} exists from an earlier fine-tuning; move it away (or --resume it with 'bitsweep qat')"
        )
    result = qat(loaded.path, config, QATConfig(), train={"epochs": args.epochs}, run_dir=run, evaluate_start=False,
                 compile_mode=args.compile, eval_batch_size=args.batch_size, progress=not args.quiet)  # fmt: skip
    assert result.quantized is not None
    tuned = load(result.quantized, "cpu", expect="quantized")
    assert tuned.quant_config is not None
    packed = save_packed(tuned.model, run / "model.safetensors",
                         PackedMeta(tuned.record, tuned.quant_config, extra=loaded.source_meta()))  # fmt: skip
    final = result.accuracy["final"]
    return {"run_dir": str(run), "epochs": args.epochs, "val_top1": final["val"].top1, "test_top1": final["test"].top1,
            "simulation": result.simulation, "file_bytes": packed.file_bytes}  # fmt: skip
