"""PTQ accuracy table: W in {1,2,4,8,16} x A in {2,4,8,16}, per-tensor vs per-channel, min-max vs MSE.

Calibrates once per observer on the float (BN-folded) model and reuses the
bit-width-free statistics for every cell. Writes the ``ptq_accuracy`` section
of BENCHMARKS.md.

    python benchmarks/ptq_accuracy.py benchmarks/work/fmnist_mbv2/best.pt
    python benchmarks/ptq_accuracy.py --quick       # tiny synthetic model, a few cells, no BENCHMARKS.md write
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsweep.config import DataConfig  # noqa: E402
from bitsweep.data import TensorLoader, load_dataset  # noqa: E402
from bitsweep.models import create_model  # noqa: E402
from bitsweep.quant import QuantConfig, ptq  # noqa: E402
from bitsweep.training import evaluate, load_model  # noqa: E402

from benchmarks._common import header, md_table, update_section  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="benchmarks/work/fmnist_mbv2/best.pt")
    p.add_argument("--quick", action="store_true", help="tiny untrained model on synthetic data, 4 cells")
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=500, help="calibration batch size")
    p.add_argument("--eval-batch-size", type=int, default=32, help="small batches run faster on a CPU (cache)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; --quick: 1)")
    args = p.parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)

    if args.quick:
        splits = load_dataset(DataConfig(name="synthetic"))
        model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25).eval()
        mean, std = splits.mean, splits.std
        wbits, abits, variants = (2, 8), (4, 8), [("per_channel", "minmax"), ("per_tensor", "mse")]
    else:
        model, info = load_model(args.checkpoint)
        splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
        mean, std = info.mean, info.std
        wbits, abits = (1, 2, 4, 8, 16), (2, 4, 8, 16)
        variants = [(g, o) for g in ("per_channel", "per_tensor") for o in ("minmax", "mse")]
    test = TensorLoader(splits.test, args.eval_batch_size, mean=mean, std=std)
    calib = TensorLoader(splits.train, args.batch_size, mean=mean, std=std)
    fp32 = evaluate(model, test).top1
    rows = []
    start = time.time()
    for granularity, observer in variants:
        base = copy.deepcopy(model)
        # Calibration statistics are bit-width free: collected once, reused for every cell.
        base_config = QuantConfig.from_bits(8, 8, granularity, observer)
        stats = ptq(base, base_config, calib, num_batches=args.calib_batches).stats
        for w in wbits:
            row: list[object] = [granularity, observer, w]
            for a in abits:
                m = copy.deepcopy(model)
                m = ptq(m, QuantConfig.from_bits(w, a, granularity, observer), stats=stats).model
                row.append(f"{evaluate(m, test).top1:.2f}")
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    seconds = time.time() - start
    table = md_table(["weights", "observer", "W bits"] + [f"A{a}" for a in abits], rows)
    text = (
        header("python benchmarks/ptq_accuracy.py " + ("--quick" if args.quick else args.checkpoint))
        + f"\nTop-1 test accuracy (%) after post-training quantization; FP32: {fp32:.2f}%. "
        f"Calibration: {args.calib_batches} unaugmented training batches of {args.batch_size}, once per observer. "
        f"{len(rows) * len(abits)} cells in {seconds:.0f} s.\n\n{table}\n"
    )
    print(text)
    if not args.quick:
        update_section("ptq_accuracy", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
