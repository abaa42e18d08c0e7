"""Post-training methods side by side: method x {W4A8, W4A4, W3A8, W3A4, W2A8, W2A4}, integer-exact, timed.

Every method quantizes the same FP32 checkpoint with the same calibration
images (the first ``--images`` unaugmented training images) through
``bitsweep.quant.ptq``; accuracies come from the integer-exact simulation on
all validation and test images. Writes the ``ptq_methods`` section of
BENCHMARKS.md.

    python benchmarks/ptq_methods.py                                  # all methods, all cells
    python benchmarks/ptq_methods.py --methods rtn,qdrop --cells 4,4  # a subset
    python benchmarks/ptq_methods.py --quick                          # tiny random model, prints only
    python benchmarks/ptq_methods.py --methods rtn,cle --granularities per_tensor,per_channel \
        --cells "8,8;6,8;4,8" --section ptq_methods_cle                 # equalization, its own section
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsweep.backend.simulate import evaluation_model, runner_for  # noqa: E402
from bitsweep.config import DataConfig  # noqa: E402
from bitsweep.data import load_dataset  # noqa: E402
from bitsweep.models import create_model  # noqa: E402
from bitsweep.quant import QuantConfig, ptq  # noqa: E402
from bitsweep.sweep.evaluate import accuracy, normalize  # noqa: E402
from bitsweep.training import load_model  # noqa: E402

from benchmarks._common import WORK, header, md_table, update_section  # noqa: E402

CELLS = ((4, 8), (4, 4), (3, 8), (3, 4), (2, 8), (2, 4))
METHODS = ("rtn", "bias_correction", "adaround", "brecq", "qdrop")


def _cells(text: str) -> list[tuple[int, int]]:
    return [tuple(int(b) for b in pair.split(",")) for pair in text.split(";")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cells", default=";".join(f"{w},{a}" for w, a in CELLS), help="W,A pairs separated by ';'")
    p.add_argument("--images", type=int, default=1024, help="calibration / reconstruction images")
    p.add_argument("--iterations", type=int, default=None, help="reconstruction steps per unit (method default)")
    p.add_argument("--eval-batch-size", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(WORK / "ptq_methods.jsonl"), help="rows, appended as they finish")
    p.add_argument("--granularities", default="per_channel", help="weight granularities, comma-separated")
    p.add_argument("--section", default="ptq_methods", help="the BENCHMARKS.md section to write")
    p.add_argument("--quick", action="store_true", help="tiny random model and data; prints only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods, cells = args.methods.split(","), _cells(args.cells)

    if args.quick:
        splits = load_dataset(DataConfig(name="synthetic"))
        model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25).eval()
        mean, std, seed = splits.mean, splits.std, 0
        args.images, args.iterations = 64, args.iterations or 5
    else:
        model, info = load_model(args.checkpoint)
        splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
        mean, std, seed = info.mean, info.std, info.seed
    calib = normalize(splits.train.images[: args.images], mean, std, torch.device("cpu"))
    batches = [calib[i : i + 256] for i in range(0, calib.shape[0], 256)]
    val = (normalize(splits.val.images, mean, std, torch.device("cpu")), splits.val.labels)
    test = (normalize(splits.test.images, mean, std, torch.device("cpu")), splits.test.labels)
    runner = runner_for("auto", len(val[1]) + len(test[1]), args.eval_batch_size)
    fp32 = accuracy(model, *test, args.eval_batch_size)[0]
    fp32_val = accuracy(model, *val, args.eval_batch_size)[0]
    print(f"FP32 val {fp32_val:.2f} test {fp32:.2f}", flush=True)

    results: dict[tuple[str, int, int], dict[str, float | str]] = {}
    options = {"images": args.images, "progress": True} | ({"iterations": args.iterations} if args.iterations else {})
    granularities = args.granularities.split(",")
    labels = [(m, g) for m in methods for g in granularities]
    for method, gran in labels:
        for w, a in cells:
            m = copy.deepcopy(model)
            start = time.perf_counter()
            qm = ptq(m, QuantConfig.from_bits(w, a, gran, method=method), batches, options=options).model
            seconds = time.perf_counter() - start
            evaluated, kind = evaluation_model(qm, val[0][:1], runner)
            row: dict[str, float | str] = {
                "method": method, "granularity": gran, "weight_bits": w, "activation_bits": a,
                "seconds": round(seconds, 1),
                "val_top1": accuracy(evaluated, *val, args.eval_batch_size)[0],
                "test_top1": accuracy(evaluated, *test, args.eval_batch_size)[0], "simulation": kind,
                "images": args.images, "seed": seed,
            }  # fmt: skip
            results[(method, gran, w, a)] = row
            print(json.dumps(row), flush=True)
            if not args.quick:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    headers = ["method"] + [f"W{w}A{a}" for w, a in cells] + ["seconds per cell (mean)"]
    rows = []
    for method, gran in labels:
        cols = [f"{results[(method, gran, w, a)]['test_top1']:.2f}" for w, a in cells]
        secs = sum(float(results[(method, gran, w, a)]["seconds"]) for w, a in cells) / len(cells)
        rows.append([method if len(granularities) == 1 else f"{method} ({gran})", *cols, f"{secs:.0f}"])
    iters = f"{args.iterations} steps per unit" if args.iterations else "default steps per unit"
    text = (
        header(" ".join(["python", "benchmarks/ptq_methods.py", *(argv if argv is not None else sys.argv[1:])]))
        + f"\nTest top-1 (%), integer-exact simulation, {len(test[1])} test images; FP32 {fp32:.2f} % "
        f"(val {fp32_val:.2f} %). Calibration and reconstruction: the first {args.images} training images, "
        f"{iters}; weights {' / '.join(granularities)}; seconds = the whole `ptq` call on {args.threads} "
        f"threads.\n\n{md_table(headers, rows)}\n"
    )
    print(text)
    if not args.quick:
        update_section(args.section, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
