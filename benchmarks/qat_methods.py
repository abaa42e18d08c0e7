"""Quantization-aware training side by side: STE vs LSQ vs LSQ + distillation at W4A4, W2A4, W2A2, W1A8.

Every run fine-tunes the same FP32 checkpoint through ``bitsweep.qat.qat`` with the same data (the
first ``--train-images`` training images, the first ``--val-images`` validation images for choosing
the best epoch), the same epochs and learning rate, and reports test top-1 of the best epoch from the
integer-exact simulation on all test images, with training time per epoch. Rows are appended to
``benchmarks/work/qat_methods.jsonl`` as they finish, so several processes (``--cells``) can share
the machine; ``--table`` writes the ``qat_methods`` section of BENCHMARKS.md from those rows.

    python benchmarks/qat_methods.py                                   # every variant at every cell
    python benchmarks/qat_methods.py --cells "2,4" --variants lsq+kd  # one run
    python benchmarks/qat_methods.py --table                           # the section from the rows so far
    python benchmarks/qat_methods.py --cells "2,4;1,8" --variants lsq+kd --epochs 3 --train-images 55000 \
        --val-images 5000 --init qdrop --lr 0.02 --threads 2              # the 3-epoch budget from a QDrop start
    python benchmarks/qat_methods.py --quick                           # tiny synthetic run, prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsweep.artifacts import load  # noqa: E402
from bitsweep.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from bitsweep.data import DatasetSplits, load_dataset  # noqa: E402
from bitsweep.qat import QATConfig, qat  # noqa: E402
from bitsweep.quant import QuantConfig  # noqa: E402
from bitsweep.sweep.evaluate import accuracy, normalize  # noqa: E402
from bitsweep.training import checkpoint_info, fit  # noqa: E402

from benchmarks._common import WORK, header, md_table, update_section  # noqa: E402

CELLS = ((4, 4), (2, 4), (2, 2), (1, 8))
VARIANTS = {"ste": ("ste", False), "lsq": ("lsq", False), "lsq+kd": ("lsq", True)}
TARGETS = {(4, 4): 0.3, (2, 4): 1.5, (2, 2): 3.0, (1, 8): 4.0}  # allowed test drop (points), issue 12
ROWS = WORK / "qat_methods.jsonl"


def _cells(text: str) -> list[tuple[int, int]]:
    return [tuple(int(b) for b in pair.split(",")) for pair in text.split(";")]  # type: ignore[misc]


def _cut(splits: DatasetSplits, train: int, val: int) -> DatasetSplits:
    return dataclasses.replace(splits, train=splits.train.subset(slice(0, train)), val=splits.val.subset(slice(0, val)))


def _budget(row: dict) -> tuple[int, int, str, float]:
    """What one run trained on and from: (epochs, training images, start, lr); each budget gets its own table."""
    return row["epochs"], row["train_images"], row.get("init", "rtn"), row["lr"]


def _group_table(rows: list[dict], fp32: float) -> str:
    """One table for runs with the same budget: a row per variant, a column per cell, the target row last."""
    cells = sorted({(r["weight_bits"], r["activation_bits"]) for r in rows}, key=lambda c: (-c[0], -c[1]))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    latest = {(r["variant"], r["weight_bits"], r["activation_bits"]): r for r in rows}
    body = []
    for v in variants:
        cols = []
        for w, a in cells:
            r = latest.get((v, w, a))
            cols.append("-" if r is None else f"{r['test_top1']:.2f} ({r['test_top1'] - fp32:+.2f})")
        secs = [r["seconds_per_epoch"] for (vv, _, _), r in latest.items() if vv == v]
        body.append([v, *cols, f"{sum(secs) / len(secs):.0f}" if secs else "-"])
    target = ["target (drop)", *[f">= {fp32 - TARGETS.get(c, 0):.2f} ({-TARGETS.get(c, 0):+.1f})" for c in cells], ""]
    r0 = rows[-1]
    steps = r0["epochs"] * (r0["train_images"] // r0["batch_size"])  # the last partial batch is dropped
    return (
        f"**{r0['epochs']} epoch(s) on the first {r0['train_images']} training images ({steps} steps).** "
        f"Test top-1 (%) of the best epoch (chosen on {r0['val_images']} validation images), integer-exact "
        f"simulation on all {r0['test_images']} test images, in brackets the change from FP32 {fp32:.2f} %. "
        f"lr {r0['lr']} cosine, batch {r0['batch_size']}, weights per channel, initial ranges from the MSE observer, "
        f"start {r0.get('init', 'rtn')}, distillation T={r0['temperature']} weight {r0['distill_weight']}; "
        f"seconds per epoch on {r0['threads']} thread(s)"
        f"{', training steps compiled' if r0.get('compiled') else ''}.\n\n"
        + md_table(["variant", *[f"W{w}A{a}" for w, a in cells], "s/epoch"], [*body, target])
        + "\n"
    )


def _table(rows: list[dict], fp32: float, command: str) -> str:
    """The section: one table per training budget, the largest budget first."""
    groups: dict[tuple[int, int, str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault(_budget(r), []).append(r)
    ordered = sorted(groups, key=lambda b: -b[0] * b[1])
    return header(command) + "\n" + "\n".join(_group_table(groups[b], fp32) for b in ordered)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--cells", default=";".join(f"{w},{a}" for w, a in CELLS), help="W,A pairs separated by ';'")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default="rtn", help="the PTQ method QAT starts from (as bitsweep qat --init)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="as bitsweep qat --compile")
    p.add_argument("--section", default="qat_methods", help="the BENCHMARKS.md section --table writes")
    p.add_argument("--table", action="store_true", help="only write the section from the rows so far")
    p.add_argument("--quick", action="store_true", help="tiny synthetic model and data; prints only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/qat_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.quick:
        tmp = Path(tempfile.mkdtemp())
        config = RunConfig(
            data=DataConfig(name="synthetic"),
            model=ModelConfig(width=0.25),
            device="cpu",
            train=TrainConfig(epochs=1, batch_size=32, tensorboard=False),
            output_dir=str(tmp),
        )
        full = load_dataset(config.data)
        checkpoint = fit(config, run_dir=tmp / "float", splits=full, progress=False).best_checkpoint
        args.train_images, args.val_images = 128, 50
    else:
        checkpoint = Path(args.checkpoint)
        info = checkpoint_info(load(checkpoint).meta)
        full = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
    splits = _cut(full, args.train_images, args.val_images)
    model = load(checkpoint).model
    test = (normalize(splits.test.images, splits.mean, splits.std, torch.device("cpu")), splits.test.labels)
    fp32 = accuracy(model, *test, 40)[0]
    if args.table:
        rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["checkpoint"] == str(checkpoint)]
        text = _table(rows, fp32, command)
        print(text)
        update_section(args.section, text)
        return 0

    rows = []
    for name in args.variants.split(","):
        method, distill = VARIANTS[name]
        for w, a in _cells(args.cells):
            work = Path(tempfile.mkdtemp(prefix="qat-", dir=WORK if not args.quick else None))
            result = qat(
                checkpoint,
                QuantConfig.from_bits(w, a, observer="mse"),
                QATConfig(method=method, distill=distill, init=args.init),
                train={"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "tensorboard": False},
                run_dir=work / "run",
                splits=splits,
                evaluate_start=False,
                compile_mode=args.compile,
                progress=not args.quick,
            )
            final = result.accuracy["final"]
            row = {
                "checkpoint": str(checkpoint),
                "variant": name,
                "weight_bits": w,
                "activation_bits": a,
                "test_top1": final["test"].top1,
                "val_top1": final["val"].top1,
                "simulation": result.simulation,
                "epochs": args.epochs,
                "train_images": len(splits.train.labels),
                "val_images": len(splits.val.labels),
                "test_images": len(splits.test.labels),
                "lr": args.lr,
                "init": args.init,
                "compiled": yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]["compile"],
                "batch_size": args.batch_size,
                "temperature": QATConfig.temperature,
                "distill_weight": QATConfig.distill_weight,
                "threads": args.threads,
                "seconds": round(result.seconds, 1),
                "seconds_per_epoch": round(sum(m["epoch_seconds"] for m in result.fit.metrics) / args.epochs, 1),
                "fp32_test_top1": fp32,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.quick:
                with open(ROWS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    if args.quick:
        print(_table(rows, fp32, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
