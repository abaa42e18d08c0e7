"""The Fashion-MNIST recipe's 3-epoch run: accuracy and time, from the benchmark checkpoint's run directory.

    python -m benchmarks.fmnist_train            # trains the checkpoint first when it is absent

Reads ``benchmarks/work/fmnist_mbv2/{metrics.csv,eval.json,environment.json}``
written by ``bitsweep train`` and rewrites the ``fmnist_train`` section of
BENCHMARKS.md. The epoch times are what the run measured, under whatever else
the machine was doing then; the clean throughput comparison is ``train_speed``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

try:
    from benchmarks._common import ROOT, md_table, update_section
    from benchmarks.fmnist_model import CHECKPOINT, TRAIN_COMMAND, ensure_checkpoint
except ImportError:  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import ROOT, md_table, update_section
    from benchmarks.fmnist_model import CHECKPOINT, TRAIN_COMMAND, ensure_checkpoint


def main() -> int:
    """Write the section from the run directory's own files."""
    run = ensure_checkpoint().parent
    rows = list(csv.DictReader(open(run / "metrics.csv", encoding="utf-8")))
    final = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    env = json.loads((run / "environment.json").read_text(encoding="utf-8"))
    table = md_table(
        ["epoch", "lr", "train loss", "train top-1 %", "val top-1 %", "epoch s", "train img/s"],
        [[r["epoch"], f"{float(r['lr']):.4f}", f"{float(r['train_loss']):.3f}", f"{float(r['train_acc']):.2f}",
          f"{float(r['val_top1']):.2f}", f"{float(r['epoch_seconds']):.0f}", f"{float(r['train_images_per_s']):.0f}"]
         for r in rows],
    )  # fmt: skip
    total = sum(float(r["epoch_seconds"]) for r in rows)
    test = final["test"]
    text = "\n".join([
        f"Command: `{' '.join(TRAIN_COMMAND)}` (section: `python -m benchmarks.fmnist_train`)  ",
        f"Date: {env.get('date')}  ",
        f"Machine: {env.get('processor')}, {env.get('cpu_count')} cores, torch {env.get('torch')}, "
        f"torch threads {env.get('torch_threads')}, git {str(env.get('git_commit'))[:10]}",
        "",
        table,
        "",
        f"**Test top-1 {test['top1']:.2f} %** (top-5 {test['top5']:.2f} %, loss {test['loss']:.4f}) on the 10,000 "
        f"test images, best epoch by validation; 3 epochs took {total / 60:.1f} min in all "
        f"(checkpoint `{CHECKPOINT.relative_to(ROOT)}`).",
    ])  # fmt: skip
    update_section("fmnist_train", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
