"""``bitsweep sweep CHECKPOINT``: every (weight bits x activation bits) cell, measured, with a recommendation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitsweep.artifacts import load
from bitsweep.cli import common
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig
from bitsweep.report import build_report
from bitsweep.runtime import choose_device
from bitsweep.search.layer_bits import LayerBits, layer_names, load_layer_bits
from bitsweep.sweep.api import format_front, sweep_checkpoint
from bitsweep.sweep.evaluate import EvalSettings
from bitsweep.sweep.runner import EXECUTORS, ExecutorConfig


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sweep`` command."""
    p = common.add_command(
        subparsers,
        "sweep",
        help="quantize a checkpoint at every bit width in a grid, measure each, recommend the smallest good one",
        description="Quantize CHECKPOINT at every combination of weight and activation bit widths (and any other "
        "listed axis), measure validation and test accuracy and the packed file size of each cell, and recommend "
        "the smallest configuration within --max-drop points of the FP32 validation accuracy. Rows are appended "
        "to OUTPUT/results.jsonl as cells finish: rerun the same command to resume an interrupted sweep.\n\n"
        "example: bitsweep sweep runs/fm/best.pt --weight-bits 1,2,4,8,16 --activation-bits 1,2,4,8,16 --jobs 2",
    )
    p.add_argument("checkpoint", help="bitsweep checkpoint (best.pt) or run directory")
    p.add_argument("--weight-bits", type=common.bit_list, default=[1, 2, 4, 8, 16], help="weight bit widths, 1..16")
    p.add_argument(
        "--activation-bits", type=common.bit_list, default=[1, 2, 4, 8, 16], help="activation bit widths, 1..16"
    )
    p.add_argument(
        "--granularity", type=common.str_list, default=["per_channel"], help="weight scales: per_channel,per_tensor"
    )
    common.add_observer_option(p, several=True)
    common.add_method_options(p, several=True)
    p.add_argument(
        "--calib-batches", type=int, default=8, help="calibration batches of training images (collected once)"
    )
    p.add_argument("--calib-batch-size", type=int, default=256, help="images per calibration batch")
    p.add_argument(
        "--batch-size", type=int, default=40, help="evaluation batch size (small keeps activations in cache)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N validation and test images (quick checks)"
    )
    p.add_argument("--full-eval", action="store_true",
                   help="measure every cell on every image; by default a cell whose validation top-1 is below half "
                   "the FP32 model's with 99.9 %% confidence stops after the first 1,000-image step that shows it, "
                   "and is measured on as many test images")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="parallel workers (each loads the model and data once)")
    p.add_argument(
        "--executor", choices=EXECUTORS, default="local", help="where cells run; local with --jobs > 1 uses processes"
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address for --executor ray (default: start a local Ray)"
    )
    common.add_threads_option(p, ", split between the --jobs workers")
    p.add_argument("--max-drop", type=float, default=1.0, help="accuracy budget: validation top-1 points below FP32")
    p.add_argument("--output", default=None, help="output directory (default: CHECKPOINT's directory/sweep)")
    p.add_argument("--data-dir", default=None, help="dataset files, when not where the checkpoint's config says")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the integer-exact simulation once per worker (auto: when a cell evaluates >= 5,000 "
                        "images; same results, faster cells)")  # fmt: skip
    p.add_argument("--add-quantized", action="append", default=[], metavar="FILE",
                   help="also measure this quantized checkpoint of the same model as a cell (a QAT run's "
                   "quantized.pt, a 'quantize' output); repeatable")  # fmt: skip
    p.add_argument("--layer-bits", action="append", default=[], metavar="FILE",
                   help="also quantize with this per-layer bit-width file (a search's layer_bits.yaml) as one more "
                   "cell, labelled by its folder and file name; repeatable")  # fmt: skip
    p.add_argument("--no-report", action="store_true", help="do not build report.md/report.html at the end")
    p.add_argument("--no-packed", action="store_true", help="do not keep each cell's packed model file")
    p.set_defaults(func=run)


def default_output(checkpoint: str) -> str:
    """``runs/x/best.pt`` -> ``runs/x/sweep``; a run directory -> ``DIR/sweep`` (so a rerun resumes)."""
    path = Path(checkpoint)
    return str((path if path.is_dir() else path.parent) / "sweep")


def load_plans(checkpoint: str, files: list[str]) -> list[tuple[str, LayerBits]]:
    """Read each layer-bits file, refusing names the checkpoint's model lacks, before any cell runs."""
    if not files:
        return []
    names = layer_names(load(checkpoint, "cpu", expect="float").model, QuantConfig.from_bits(8, 8))
    return [(f, load_layer_bits(f, names)) for f in files]


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the Pareto front and the recommendation, build the report."""
    for name in ("calib_batches", "calib_batch_size", "batch_size", "jobs"):
        common.require_positive("--" + name.replace("_", "-"), getattr(args, name))
    try:
        options = common.method_options(args)
        settings = EvalSettings(
            args.calib_batches, args.calib_batch_size, args.batch_size, args.limit, args.compile,
            method_images=int(options["images"]), method_iterations=args.method_iterations,
            stop_collapsed=not args.full_eval,
        )  # fmt: skip
        executor = ExecutorConfig(kind=args.executor, jobs=args.jobs, address=args.address, threads=args.threads)
    except ValueError as e:
        raise BitsweepError(str(e)) from None
    axes = {
        "weight_bits": args.weight_bits,
        "activation_bits": args.activation_bits,
        "granularity": args.granularity,
        "observer": args.observer,
        "method": args.methods,
    }
    output = args.output or default_output(args.checkpoint)
    common.check_writable(output, "--output")
    plans = load_plans(args.checkpoint, args.layer_bits)
    try:
        outcome = sweep_checkpoint(
            args.checkpoint, output, axes, settings, executor, choose_device(args.device), args.data_dir,
            args.max_drop, keep_packed=not args.no_packed, quantized=args.add_quantized, layer_bits=plans,
        )  # fmt: skip
    except KeyboardInterrupt:
        print(f"sweep interrupted; finished cells are kept in {output}/results.jsonl - rerun the same command "
              "to do only the rest", file=sys.stderr)  # fmt: skip
        raise
    run_ = outcome.run
    print(f"{len(run_.ran)} cell(s) evaluated, {len(run_.skipped)} resumed from {run_.results.path} "
          f"in {run_.seconds:.1f} s")  # fmt: skip
    print("\nPareto front (packed size vs validation top-1):")
    print(format_front(outcome.front))
    print(f"\nrecommended (max drop {args.max_drop:g}): {outcome.recommendation.summary()}")
    print(f"results: {run_.results.path} and {run_.results.path.with_suffix('.csv')}")
    if not args.no_report:
        # Built here, not by the sweep: the report package reads sweep results, so it sits above it.
        print(f"report: {build_report(run_.results, output, args.max_drop).html}")
    return 0
