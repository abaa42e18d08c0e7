"""``bitsweep search`` end to end on a tiny synthetic checkpoint, its user errors, and ``quantize --layer-bits``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from bitsweep.artifacts import load
from bitsweep.cli import main
from bitsweep.quant.inspect import activation_quantizers
from bitsweep.search import layer_names, load_layer_bits
from bitsweep.search.layer_bits import activation_key

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
    # float16 scales by default, written where 'quantize --layer-bits' finds it
    packed_config = load(out / "model.safetensors").quant_config
    assert packed_config is not None and record["scale_dtype"] == plan.scale_dtype == packed_config.scale_dtype
    assert plan.scale_dtype == "float16"

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
        (["--max-drop", "1", "--scale-dtype", "bf16"], "invalid choice: 'bf16'"),
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


def test_quantize_takes_the_scale_dtype_of_the_layer_bits_file_unless_given(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"weight_bits": 4, "scale_dtype": "float16"}))
    for extra, want in (([], "float16"), (["--scale-dtype", "float32"], "float32")):
        out = tmp_path / f"q-{want}.pt"
        rc = main(["quantize", str(checkpoint), "--layer-bits", str(plan), "--calib-batches", "1", "--batch-size",
                   "64", "--output", str(out), "--device", "cpu", *extra])  # fmt: skip
        assert rc == 0
        loaded = load(out)
        assert loaded.quant_config is not None and loaded.quant_config.scale_dtype == want
        conv = dict(loaded.model.named_modules())["features.1.conv.0.0"]
        scale = conv.weight_quantizer.scale
        assert torch.equal(scale.half().float(), scale) == (want == "float16")
    capsys.readouterr()


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
    assert packed.quant_config.scale_dtype == plan.scale_dtype == "float16"  # QAT got the search's scale dtype
    # a second fine-tuning into the same folder is refused before any work
    _one_line_error(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), "--finetune", "qat",
                     *FAST], capsys, "holds an earlier fine-tuning")  # fmt: skip


@pytest.mark.slow
def test_search_activation_bits_under_a_peak_memory_budget(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Sites whose tensor is over 10 kB at 8 bits (48 x 16 x 16 = 12,288 values) go to 4 bits; the plan's YAML
    quantizes exactly so through 'quantize --layer-bits'."""
    out = tmp_path / "search"
    argv = ["search", str(checkpoint), "--max-mb", "100", "--activation-bits", "4,8", "--max-activation-kb", "10",
            "--output-dir", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "activation bits per site:" in text and "(budget 10,000 bytes)" in text
    record = json.loads((out / "search.json").read_text())
    per_site = record["activation_bits_per_site"]
    assert record["sizes_equal"] and record["activation_bits"] == [4, 8] and record["max_activation_bytes"] == 10_000
    assert 4 in per_site.values() and record["peak_activation_bytes"] <= 10_000
    model = load(checkpoint).model
    plan = load_layer_bits(out / "layer_bits.yaml", layer_names(model))
    sites = layer_names(model).activations
    assert {s: plan.activation_bits_of(s) for s in sites} == per_site and set(per_site) == set(sites)
    quantized = tmp_path / "q.pt"
    assert main(["quantize", str(checkpoint), "--layer-bits", str(out / "layer_bits.yaml"), "--calib-batches", "1",
                 "--batch-size", "64", "--output", str(quantized), "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    bits = {activation_key(n): q.spec.bits for n, q in activation_quantizers(load(quantized).model)}
    assert bits == per_site


def test_impossible_activation_budget_names_the_smallest_peak(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    line = _one_line_error(["search", str(checkpoint), "--max-drop", "1", "--activation-bits", "4,8",
                            "--max-activation-kb", "6", "--output-dir", str(out), *FAST], capsys,
                           "the smallest reachable peak is 6,144 bytes")  # fmt: skip
    assert "12,288 values at 4 bits" in line and "at least 6.144 kB" in line and not out.exists()
    _one_line_error(["search", str(checkpoint), "--max-drop", "1", "--max-activation-kb", "0", "--output-dir",
                     str(out), "--quiet"], capsys, "--max-activation-kb must be at least 0.001")  # fmt: skip


@pytest.mark.slow
def test_search_with_the_hessian_keeps_both_estimates(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    hessian = ["--sensitivity", "hessian", "--hessian-samples", "2", "--hessian-images", "16"]
    assert main(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), *hessian, *FAST]) == 0
    text = capsys.readouterr().out
    assert "sensitivity: estimated Hessian traces, 2 samples (16 validation images" in text
    assert "predicted summed loss increase (Hessian estimate)" in text
    assert {p.name for p in out.iterdir()} == FILES - {"sensitivity.json"} | {"hessian.json"}
    record = json.loads((out / "search.json").read_text())
    assert record["sensitivity_estimate"] == "hessian" and record["ratio"] >= 6 and record["sizes_equal"]
    traces = record["hessian"]["traces"]
    assert traces["samples"] == 2 and traces["images"] == 16
    assert len(traces["traces"]) == len(record["layer_bits"]["weights"])
    assert "rank_agreement" not in record  # no measured sensitivity yet

    # the measured sensitivity in the same folder: search.json keeps the cached Hessian record too, and compares
    assert main(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), *FAST]) == 0
    record = json.loads((out / "search.json").read_text())
    assert record["sensitivity_estimate"] == "measured" and "hessian" in record
    assert set(record["rank_agreement"]) == {"loss", "top1"} and "2 bits" in record["rank_agreement"]["loss"]
    # and back: the Hessian traces come from their cache, the measured cache is named
    capsys.readouterr()
    assert main(["search", str(checkpoint), "--max-ratio", "6", "--output-dir", str(out), *hessian, *FAST]) == 0
    assert "sensitivity: reused the cache (16 validation images" in capsys.readouterr().out
    record = json.loads((out / "search.json").read_text())
    assert record["measured_sensitivity"] == str(out / "sensitivity.json") and "rank_agreement" in record
