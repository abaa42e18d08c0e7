"""Integer reference vs fake-quant simulation: top-1 agreement and max logit difference (W8A8, W4A8).

Full run::

    python benchmarks/intref_agreement.py --checkpoint benchmarks/work/fmnist_mbv2/best.pt

Quick check (random width-0.25 model, 64 random images, prints only)::

    python benchmarks/intref_agreement.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, header, md_table, update_section  # noqa: E402
from onnx_latency import _setup  # noqa: E402

from bitsweep.measure.intref import compare  # noqa: E402
from bitsweep.quant import QuantConfig, calibrate, convert, quantize_  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    parser.add_argument("--configs", default="8,8;4,8", help="W,A pairs separated by ';'")
    parser.add_argument("--max-batches", type=int, default=None, help="limit test batches (500 images each)")
    parser.add_argument("--quick", action="store_true", help="random tiny model and images; prints only")
    args = parser.parse_args()
    model, _, calib, test = _setup(args)
    rows = []
    for pair in args.configs.split(";"):
        w, a = (int(v) for v in pair.split(","))
        q = copy.deepcopy(model)
        quantize_(q, QuantConfig.from_bits(w, a))
        calibrate(q, calib, len(calib))
        convert(q)
        r = compare(q, test, args.max_batches)
        rows.append([f"W{w}A{a}", r.images, f"{r.simulated_top1:.2f}", f"{r.integer_top1:.2f}",
                     f"{r.top1_agreement:.2f}", f"{r.max_logit_diff:.3g}", f"{r.mean_abs_logit_diff:.3g}"])  # fmt: skip
    table = md_table(["config", "images", "simulated top-1 %", "integer top-1 %", "prediction agreement %",
                      "max |logit diff|", "mean |logit diff|"], rows)  # fmt: skip
    cmd = "python benchmarks/intref_agreement.py " + " ".join(sys.argv[1:])
    text = (f"### Integer reference vs simulation\n\n{header(cmd)}\n{table}\n\n"
            "Integer reference = int64 accumulation, int32 biases, fixed-point requantization (bitsweep.measure.intref).\n")  # fmt: skip
    print(text)
    if not args.quick:
        update_section("intref_agreement", text)


if __name__ == "__main__":
    main()
