"""How much fake quantization slows evaluation down, and what each calibration observer costs.

Fake-quant evaluation does the float work plus the quantize/dequantize of
every activation, so FP32 evaluation time is its lower limit; the table says
how close bitsweep's converted W8A8 and W4A4 models get to it. Calibration
time is measured per observer method (minmax, moving_average, percentile,
mse) because percentile and mse keep and search more statistics than minmax.

Each timing is the median of ``--repeats`` runs on the same batches (the
first pass is a warm-up). Writes the ``eval_speed`` section of BENCHMARKS.md
(``--quick``: ``benchmarks/work/BENCHMARKS.quick.md``).

    python -m benchmarks.eval_speed            # THE FP32 checkpoint, 2000 test images, 512 calibration images
    python -m benchmarks.eval_speed --quick    # tiny checkpoint, 256 test images, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from benchmarks import _common
    from benchmarks.fmnist_model import BenchData, benchmark_checkpoint, load_bench_data, top1
except ImportError:  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _common
    from benchmarks.fmnist_model import BenchData, benchmark_checkpoint, load_bench_data, top1

OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
QUICK_MD = _common.WORK / "BENCHMARKS.quick.md"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (after one untimed warm-up call)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quantized_model(checkpoint: Path, data: BenchData, w: int, a: int, observer: str = "minmax") -> torch.nn.Module:
    """A converted bitsweep model (per-channel weights, BN folded) ready for fake-quant evaluation."""
    from bitsweep.quant import QuantConfig, ptq
    from bitsweep.training import load_model

    model, _ = load_model(checkpoint)
    return ptq(model, QuantConfig.from_bits(w, a, "per_channel", observer), data.calib).model


def eval_rows(checkpoint: Path, data: BenchData, repeats: int) -> list[list[object]]:
    """FP32 vs fake-quant W8A8/W4A4 evaluation throughput on the same test batches."""
    from bitsweep.training import load_model

    fp32, _ = load_model(checkpoint)
    models = {"FP32": fp32, "W8A8 fake-quant": quantized_model(checkpoint, data, 8, 8),
              "W4A4 fake-quant": quantized_model(checkpoint, data, 4, 4)}  # fmt: skip
    rows = []
    base = None
    for name, model in models.items():
        secs = median_seconds(lambda m=model: top1(m, data.test), repeats)
        base = base or secs
        rows.append([name, data.test_images, f"{secs:.2f}", f"{data.test_images / secs:,.0f}", f"{secs / base:.2f}x"])
        print(f"[eval_speed] {name}: {secs:.2f} s", flush=True)
    return rows


def calibration_rows(checkpoint: Path, data: BenchData, repeats: int) -> list[list[object]]:
    """Seconds to calibrate (observe activations) and to convert (choose qparams), per observer, at W8A8.

    ``ptq`` runs prepare, calibrate and convert in one call; the convert share is timed as ``ptq``
    from the statistics of the first run (prepare + convert), the calibrate share is the difference.
    """
    from bitsweep.quant import QuantConfig, ptq
    from bitsweep.training import load_model

    rows = []
    for obs in OBSERVERS:
        cal, conv = [], []
        config = QuantConfig.from_bits(8, 8, "per_channel", obs)
        for _ in range(repeats):
            model, _ = load_model(checkpoint)
            again, _ = load_model(checkpoint)
            t0 = time.perf_counter()
            stats = ptq(model, config, data.calib).stats
            t1 = time.perf_counter()
            ptq(again, config, stats=stats)
            t2 = time.perf_counter()
            cal.append((t1 - t0) - (t2 - t1))
            conv.append(t2 - t1)
        c, v = statistics.median(cal), statistics.median(conv)
        rows.append([obs, data.calib_images, f"{c:.2f}", f"{v:.2f}", f"{c + v:.2f}"])
        print(f"[eval_speed] calibrate {obs}: {c:.2f} s + convert {v:.2f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write the eval_speed section."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, 256 test images, 1 repeat")
    p.add_argument("--test-images", type=int, default=None, help="default 2000 (quick: 256)")
    p.add_argument("--calib-images", type=int, default=None, help="default 512 (quick: 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median reported (default 3)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    test_images = args.test_images or (256 if args.quick else 2000)
    calib_images = args.calib_images or (128 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    checkpoint = benchmark_checkpoint(args.quick)
    data = load_bench_data(checkpoint, calib_images, test_images, data_dir=args.data_dir)
    ev = eval_rows(checkpoint, data, repeats)
    cal = calibration_rows(checkpoint, data, repeats)
    command = "python -m benchmarks.eval_speed" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    md = (
        _common.header(command)
        + f"Checkpoint: `{checkpoint.relative_to(_common.ROOT)}`; batch 256; median of {repeats} timed run(s) "
        "after a warm-up. FP32 is the limit fake quantization can approach.\n\n"
        + _common.md_table(["Model", "Images", "Seconds", "Images/s", "Time vs FP32"], ev)
        + "\n\nCalibration at W8A8 (per-channel weights), per observer:\n\n"
        + _common.md_table(["Observer", "Calibration images", "calibrate s", "convert s", "Total s"], cal)
        + "\n"
    )
    print(md)
    if not args.no_write:
        path = QUICK_MD if args.quick else _common.BENCHMARKS_MD
        _common.update_section("eval_speed", md, path)
        print(f"[eval_speed] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
