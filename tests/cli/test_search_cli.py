"""``bitsweep search`` end to end on a tiny synthetic checkpoint, its user errors, and ``quantize --layer-bits``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from bitsweep.artifacts import load
from bitsweep.cli import main
from bitsweep.search import layer_names, load_layer_bits

FAST = ["--weight-bits", "2,8", "--val-images", "40", "--calib-batches", "1", "--calib-batch-size", "64",
        "--compile", "off", "--device", "cpu", "--quiet"]  # fmt: skip
FILES = {"layer_bits.yaml", "model.safetensors", "sensitivity.json", "search.json"}


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str], message: str) -> str:
    try:
        status = main(argv)
    except SystemExit as e:  # argparse errors
        status = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], err
    return lines[0]


@pytest.mark.slow
def test_search_writes_four_files_with_the_predicted_size(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    assert main(["search", str(checkpoint), "--max-mb", "100", "--output-dir", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == FILES and "sensitivity: measured" in text
    real, predicted = (int(v.replace(",", "")) for v in re.search(r"packed file: ([\d,]+) bytes \(predicted ([\d,]+)",
                                                                  text).groups())  # fmt: skip
    assert real == predicted == os.path.getsize(out / "model.safetensors")
    model = load(checkpoint).model
    plan = load_layer_bits(out / "layer_bits.yaml", layer_names(model))
    assert set(plan.weights) == set(layer_names(model).weights) and set(plan.weights.values()) == {8}  # generous
    record = json.loads((out / "search.json").read_text())
    assert record["sizes_equal"] and record["file_bytes"] == real and record["max_bytes"] == 100_000_000
    assert len(record["rounds"]) == 1 and record["test_top1"] is not None and record["val_images"] == 40
    assert load(out / "model.safetensors").kind == "packed"

    # Same checkpoint and candidate bits, another budget: the sensitivity is reused, not measured again.
    assert main(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "sensitivity: reused the cache" in text
    record = json.loads((out / "search.json").read_text())
    assert record["ratio"] >= 6 and record["file_bytes"] == os.path.getsize(out / "model.safetensors")
    assert record["max_bytes"] == record["fp32_bytes"] // 6 and record["sizes_equal"]


def test_impossible_size_names_the_smallest_and_writes_nothing(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    line = _one_line_error(["search", str(checkpoint), "--max-mb", "0.001", "--output-dir", str(out), *FAST], capsys,
                           "the smallest reachable size is")  # fmt: skip
    assert re.search(r"no plan fits in 1,000 bytes; the smallest reachable size is [\d,]+ bytes", line)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-mb", "1", "--max-drop", "1"], "not allowed with argument"),
        ([], "one of the arguments --max-mb --max-ratio --max-drop is required"),
        (["--max-ratio", "-2"], "--max-ratio must be a positive number"),
        (["--max-drop", "nan"], "--max-drop must be a number of points >= 0"),
        (["--max-drop", "1", "--weight-bits", "2,,8"], "empty item"),
        (["--max-drop", "1", "--method", "bogus"], "unknown post-training method 'bogus'"),
    ],
)
def test_bad_budgets_are_refused(checkpoint: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "search"
    _one_line_error(["search", str(checkpoint), "--output-dir", str(out), "--quiet", *extra], capsys, message)
    assert not out.exists()


def test_unwritable_output_is_refused_before_work(checkpoint: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(["search", str(checkpoint), "--max-drop", "1", "--output-dir", str(blocker / "out")], capsys,
                    "is a file, not a folder")  # fmt: skip


def test_quantize_with_layer_bits(checkpoint: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"weight_bits": 4, "weights": {"features.1.conv.0.0": 2}}))
    out = tmp_path / "q.pt"
    rc = main(["quantize", str(checkpoint), "--layer-bits", str(plan), "--weight-bits", "8", "--calib-batches", "1",
               "--batch-size", "64", "--output", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0 and "mixed" in capsys.readouterr().out
    layers = dict(load(out).model.named_modules())
    two, four = layers["features.1.conv.0.0"].weight_quantizer, layers["features.2.conv.0.0"].weight_quantizer
    assert two.spec.bits == 2 and four.spec.bits == 4  # the plan's default replaces --weight-bits 8
    q = two.int_weight()
    assert int(q.min()) >= -1 and int(q.max()) <= 1 and len(q.unique()) == 3  # signed narrow-range 2 bits


def test_quantize_refuses_a_bad_layer_bits_file(checkpoint: Path, tmp_path: Path, capsys) -> None:
    plan, out = tmp_path / "plan.yaml", tmp_path / "q.pt"
    plan.write_text(yaml.safe_dump({"weights": {"features.1.conv.0.O": 2}}))
    line = _one_line_error(["quantize", str(checkpoint), "--layer-bits", str(plan), "--output", str(out),
                            "--device", "cpu"], capsys, "no weight layer named 'features.1.conv.0.O'")  # fmt: skip
    assert "did you mean 'features.1.conv.0.0'" in line and not out.exists()
    plan.write_text("weights: [1, 2]\n")
    _one_line_error(["quantize", str(checkpoint), "--layer-bits", str(plan), "--output", str(out), "--device", "cpu"],
                    capsys, "must be a mapping of layer name to bits")  # fmt: skip


@pytest.mark.slow
def test_search_then_qat_finetune_of_the_chosen_plan(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    assert main(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), "--finetune", "qat",
                 "--epochs", "1", *FAST]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "after 1 QAT epoch(s): validation top-1" in text
    record = json.loads((out / "search.json").read_text())
    tuned = record["finetune"]
    assert tuned["file_bytes"] == os.path.getsize(out / "qat" / "model.safetensors")
    assert record["fp32_bytes"] / tuned["file_bytes"] >= 6  # fine-tuning keeps the plan's bits, so its size
    assert tuned["simulation"] == "integer-exact" and (out / "qat" / "quantized.pt").is_file()
    plan = load_layer_bits(out / "layer_bits.yaml")
    packed = load(out / "qat" / "model.safetensors")
    assert packed.quant_config is not None
    for name, bits in plan.weights.items():
        assert packed.quant_config.spec_for(name).bits == bits  # type: ignore[union-attr]
    # a second fine-tuning into the same folder is refused before any work
    _one_line_error(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), "--finetune", "qat",
                     *FAST], capsys, "holds an earlier fine-tuning")  # fmt: skip
