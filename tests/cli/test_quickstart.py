"""The quickstart's recommendation: 600 validation images, the drop with its interval, "within noise" in words."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bitsweep.cli import main
from bitsweep.cli.quickstart import QUICKSTART_VAL_IMAGES, noise_lines, quickstart_config
from bitsweep.runtime import torch_threads
from bitsweep.sweep.pareto import recommend

ROWS = [
    {"cell_id": "fp", "label": "FP32", "weight_bits": None, "activation_bits": None, "val_top1": 95.67,
     "size_bytes": 1000},
    {"cell_id": "w8", "label": "W8A8", "weight_bits": 8, "activation_bits": 8, "val_top1": 94.33, "size_bytes": 300},
    {"cell_id": "w4", "label": "W4A8", "weight_bits": 4, "activation_bits": 8, "val_top1": 80.0, "size_bytes": 200},
]  # fmt: skip


def test_recipe_validates_on_600_images() -> None:
    assert quickstart_config().data.val_size == QUICKSTART_VAL_IMAGES == 600


def test_nearest_miss_within_noise_is_said_in_words(tmp_path: Path) -> None:
    # Issue 15's case: W8A8 lost 1.33 points, so FP32 was advised; without per-image results the
    # (unpaired) interval shows that loss is compatible with staying inside the 1-point budget.
    rec = recommend(ROWS, 95.67, 1.0)
    assert rec.row is None
    lines = noise_lines(ROWS, rec, 600, tmp_path / "best.pt", tmp_path / "packed")
    assert lines[0].startswith("W8A8 vs FP32 on the validation split: drop 1.34 points (95 % CI ")
    assert "(unpaired normal); within noise of the 1-point budget" in lines[0]
    assert lines[1].startswith("so keeping FP32 is not clearly better")


def test_clear_miss_says_beyond(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[2]]
    lines = noise_lines(rows, recommend(rows, 95.67, 1.0), 600, tmp_path / "best.pt", tmp_path / "packed")
    assert lines == [lines[0]] and "beyond the 1-point budget" in lines[0]


@pytest.mark.slow
def test_quickstart_prints_a_paired_interval_and_repeats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    with torch_threads(1):
        for run in ("a", "b"):
            argv = ["quickstart", "--output-dir", str(tmp_path / run), "--epochs", "2", "--device", "cpu", "--quiet",
                    "--threads", "1"]  # fmt: skip
            assert main(argv) == 0
            outputs.append(capsys.readouterr().out)
    run_dir = tmp_path / "a" / "quickstart-digits-mobilenetv2"
    assert json.loads((run_dir / "eval.json").read_text())["val"]["images"] == 600
    assert re.search(r"vs FP32 on the validation split: drop -?\d+\.\d\d points \(95 % CI .* 600 images\) "
                     r"\(paired bootstrap\); (within|beyond)", outputs[0])  # fmt: skip
    strip = [re.sub(r"in \d+ s|/tmp\S*|report: \S+", "", o) for o in outputs]
    assert strip[0] == strip[1]  # same seed, same machine, same threads: the same numbers
