"""Integer reference vs the integer-exact simulation (and fake-quant): top-1 agreement, max logit difference.

Runs, on every test image, the three executors of one converted model: the integer-exact simulation (where
bitsweep's accuracies come from), the int64 integer reference and the fake-quant modules.

Full run::

    python benchmarks/intref_agreement.py --checkpoint benchmarks/work/fmnist_mbv2/best.pt

Quick check (random width-0.25 model, 64 random images, prints only)::

    python benchmarks/intref_agreement.py --quick
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, header, md_table, update_section  # noqa: E402
from onnx_latency import _setup  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bitsweep.backend.intref import compare  # noqa: E402
from bitsweep.quant import QuantConfig, ptq  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    parser.add_argument("--configs", default="8,8;4,8", help="W,A pairs separated by ';'")
    parser.add_argument("--max-batches", type=int, default=None, help="limit test batches (250 images each)")
    parser.add_argument("--quick", action="store_true", help="random tiny model and images; prints only")
    args = parser.parse_args()
    model, _, calib, test = _setup(args)
    # 250-image batches keep the int64 reference's tensors small (500 needed ~7 GB).
    test = [(x[i : i + 250], y[i : i + 250]) for x, y in test for i in range(0, x.shape[0], 250)]
    rows = []
    for pair in args.configs.split(";"):
        w, a = (int(v) for v in pair.split(","))
        q = copy.deepcopy(model)
        q = ptq(q, QuantConfig.from_bits(w, a), calib).model
        start = time.perf_counter()
        r = compare(q, tqdm(test, desc=f"W{w}A{a}", unit="batch", leave=False), args.max_batches)
        seconds = time.perf_counter() - start
        rows.append([f"W{w}A{a}", r.images, f"{r.simulated_top1:.2f}", f"{r.integer_top1:.2f}",
                     f"{r.top1_agreement:.2f}", f"{r.max_logit_diff:.3g}", "yes" if r.float32_exact else "no",
                     f"{r.fakequant_top1:.2f}", f"{r.fakequant_agreement:.2f}", f"{r.fakequant_max_logit_diff:.3g}",
                     f"{seconds:.0f}"])  # fmt: skip
        print(rows[-1], flush=True)
    table = md_table(["config", "images", "simulation top-1 %", "integer reference top-1 %",
                      "same prediction %", "max abs logit diff", "float32 exact",
                      "fake-quant top-1 %", "fake-quant same prediction %", "fake-quant max abs logit diff", "seconds"],
                     rows)  # fmt: skip
    cmd = "python benchmarks/intref_agreement.py " + " ".join(sys.argv[1:])
    text = (f"### Integer reference vs simulation\n\n{header(cmd)}\n{table}\n\n"
            "Simulation = the integer-exact simulation every bitsweep accuracy comes from (bitsweep.backend.simulate); "
            "integer reference = int64 tensors, integer biases, fixed-point requantization with a rounding right shift "
            "(bitsweep.backend.intref); fake-quant = the converted modules "
            "(float32 convolutions of dequantized values). "
            "Both columns of differences compare logits with the integer reference.\n")  # fmt: skip
    print(text)
    if not args.quick:
        update_section("intref_agreement", text)


if __name__ == "__main__":
    main()
