"""End to end: a real (tiny) checkpoint through ``bitsweep sweep`` and ``bitsweep report``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bitsweep.cli import main
from bitsweep.sweep.evaluate import file_sha256
from bitsweep.sweep.lock import sweep_lock
from bitsweep.sweep.results import read_results

V1_RESULTS = Path(__file__).parent / "data" / "v1_results.jsonl"  # written before the method axis existed
V1_ARGS = ["--weight-bits", "2,8", "--activation-bits", "8", "--granularity", "per_channel,per_tensor", "--limit", "64",
           "--calib-batches", "2", "--calib-batch-size", "32", "--batch-size", "64", "--no-packed"]  # fmt: skip

ARGS = ["--weight-bits", "2,8", "--activation-bits", "8", "--limit", "64", "--calib-batches", "2",
        "--calib-batch-size", "32", "--batch-size", "64"]  # fmt: skip


def test_sweep_cli_end_to_end_then_resume(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    rc = main(["sweep", str(tiny_checkpoint), *ARGS, "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "3 cell(s) evaluated, 0 resumed" in text
    assert "Pareto front" in text and "recommended (max drop 1)" in text
    res = read_results(out / "results.jsonl")
    rows = {r["label"]: r for r in res.rows}
    assert set(rows) == {"FP32", "W2A8 per_channel minmax", "W8A8 per_channel minmax"}
    fp32, w2, w8 = rows["FP32"], rows["W2A8 per_channel minmax"], rows["W8A8 per_channel minmax"]
    # measured sizes: the packed file on disk is the size, and fewer bits make a smaller file
    for r in (w2, w8):
        assert os.path.getsize(r["packed_file"]) == r["size_bytes"]
        assert r["model_ratio"] == pytest.approx(fp32["size_bytes"] / r["size_bytes"])
        assert r["act_peak_ratio"] == pytest.approx(4.0, rel=0.05)  # 8-bit activations vs FP32
        assert r["images_val"] == 64 and r["images_test"] == 64
        assert r["simulation"] == "integer-exact"  # accuracies an integer deployment reproduces bit for bit
    assert w2["size_bytes"] < w8["size_bytes"] < fp32["size_bytes"]
    assert w2["weight_ratio"] > w8["weight_ratio"] > 1.0
    for r in rows.values():
        assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 100.0
    assert res.header["environment"]["torch"]
    assert res.header["identity"]["eval.limit"] == 64
    html = (out / "report.html").read_text()
    assert "W8A8 per_channel minmax" in html or "no quantized configuration" in html
    # the CSV beside the JSONL has one line per row plus its header
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 3

    # Resume: the same command redoes nothing.
    rc = main(["sweep", str(tiny_checkpoint), *ARGS, "--output", str(out), "--no-report"])
    assert rc == 0
    assert "0 cell(s) evaluated, 3 resumed" in capsys.readouterr().out
    # `bitsweep report` rebuilds the report elsewhere from the results file alone.
    rc = main(["report", str(out / "results.jsonl"), "--output", str(tmp_path / "rep")])
    assert rc == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert "report:" in capsys.readouterr().out


def test_sweep_refuses_results_of_another_checkpoint(
    tiny_checkpoint: Path, other_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    header = {"format": "bitsweep-sweep-results", "version": 1, "kind": "header",
              "identity": {"checkpoint_sha256": "0" * 64, "dataset": "synthetic"}}  # fmt: skip
    (out / "results.jsonl").write_text(json.dumps(header) + "\n")
    rc = main(["sweep", str(other_checkpoint), *ARGS, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "belongs to another sweep" in err and "checkpoint_sha256" in err and "--output" in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "results.jsonl").read_text().count("\n") == 1  # untouched


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--weight-bits", "0"], "1 to 16"),
        (["--observer", "bogus"], "unknown observer 'bogus'"),
        (["--methods", "bogus"], "method 'bogus'"),
        (["--granularity", "per_row"], "granularity"),
        (["--jobs", "0"], "--jobs must be a positive"),
        (["--max-drop", "-1"], "max-drop"),
        (["--address", "1.2.3.4:6379"], "--executor ray"),
    ],
)
def test_sweep_bad_input_is_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], needle: str
) -> None:
    rc = main(["sweep", str(tiny_checkpoint), *ARGS, *extra, "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "results.jsonl").exists()


def test_missing_checkpoint_and_missing_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "s")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_results_from_before_the_method_axis_resume_with_nothing_recomputed(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    lines = V1_RESULTS.read_text().splitlines()
    header = json.loads(lines[0])
    # The file names the checkpoint by its bytes, which torch.save does not reproduce exactly across runs;
    # point it at this session's (identically built) checkpoint. Cell ids are what is under test.
    header["identity"]["checkpoint_sha256"] = file_sha256(tiny_checkpoint)
    (out / "results.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    rc = main(["sweep", str(tiny_checkpoint), *V1_ARGS, "--methods", "rtn", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "0 cell(s) evaluated, 5 resumed" in text
    assert len(read_results(out / "results.jsonl").rows) == 5
    assert "W8A8 per_channel minmax" in (out / "report.md").read_text()


def test_a_folder_in_use_by_another_sweep_is_one_line_and_exit_2(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    with sweep_lock(out):
        rc = main(["sweep", str(tiny_checkpoint), *ARGS, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        f"bitsweep sweep: error: '{out}' is in use by another sweep (pid {os.getpid()}); "
        "wait for it or choose another --output"
    ]
    assert not (out / "results.jsonl").exists() and not (out / "report.html").exists()


def test_sweep_with_two_methods_puts_both_in_one_report(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "methods"
    args = ["--weight-bits", "4", "--activation-bits", "8", "--limit", "64", "--calib-batches", "1",
            "--calib-batch-size", "32", "--batch-size", "64", "--method-images", "32",
            "--method-iterations", "2"]  # fmt: skip
    rc = main(["sweep", str(tiny_checkpoint), *args, "--methods", "rtn,adaround", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = {(r.get("method", "rtn"), r["label"]) for r in read_results(out / "results.jsonl").rows}
    assert {m for m, _ in rows if m != "rtn"} == {"adaround"} and len(rows) == 3  # FP32 + one cell per method
    labels = [label for _, label in rows]
    assert len(set(labels)) == 3  # the method is part of the cell's label, so the report can tell them apart
    report = (out / "report.md").read_text()
    assert all(label in report for label in labels if label != "FP32")
    assert read_results(out / "results.jsonl").header["identity"]["eval.method_iterations"] == 2


def test_a_qat_checkpoint_is_a_cell_of_the_sweep_and_its_report(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from bitsweep.qat import QATConfig, qat
    from bitsweep.quant import QuantConfig

    trained = qat(tiny_checkpoint, QuantConfig.from_bits(2, 4, observer="mse"), QATConfig(distill=False),
                  train={"epochs": 1, "batch_size": 50, "tensorboard": False}, run_dir=tmp_path / "qat-w2a4",
                  evaluate_start=False, compile_mode="off", progress=False)  # fmt: skip
    assert trained.quantized is not None
    out = tmp_path / "sweep"
    args = ["--weight-bits", "4", "--activation-bits", "8", "--limit", "64", "--calib-batches", "1",
            "--calib-batch-size", "32", "--batch-size", "64", "--output", str(out)]  # fmt: skip
    rc = main(["sweep", str(tiny_checkpoint), *args, "--add-quantized", str(trained.quantized)])
    assert rc == 0, capsys.readouterr().err
    rows = read_results(out / "results.jsonl").rows
    qat_rows = [r for r in rows if r.get("checkpoint")]
    assert len(rows) == 3 and len(qat_rows) == 1
    row = qat_rows[0]
    assert row["label"] == "W2A4 from qat-w2a4/quantized.pt" and row["simulation"] == "integer-exact"
    assert (row["weight_bits"], row["activation_bits"]) == (2, 4)
    assert row["size_bytes"] == (out / "packed" / f"{row['cell_id']}.safetensors").stat().st_size
    assert "W2A4 from qat-w2a4/quantized.pt" in (out / "report.md").read_text()
    # a missing file is one line, before any cell runs
    assert main(["sweep", str(tiny_checkpoint), *args[:-1], str(tmp_path / "s2"), "--add-quantized",
                 str(tmp_path / "nope.pt")]) == 2  # fmt: skip
    assert "not found" in capsys.readouterr().err and not (tmp_path / "s2" / "results.jsonl").exists()


def test_a_layer_bits_plan_is_a_cell_of_the_sweep_resumed_and_reported(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from bitsweep.artifacts import load, read_header
    from bitsweep.quant import QuantConfig
    from bitsweep.report.search import packed_breakdown
    from bitsweep.search import LayerBits, layer_names, save_layer_bits
    from bitsweep.sweep.evaluate import quant_config_for
    from bitsweep.sweep.grid import Cell, plan_cell

    names = layer_names(load(tiny_checkpoint).model)
    weights = {n: (2, 4)[i % 2] for i, n in enumerate(names.weights)}
    plan = LayerBits(8, 8, weights, {names.activations[1]: 6}, scale_dtype="float16")  # as a search may write it
    path = save_layer_bits(plan, tmp_path / "search-a" / "layer_bits.yaml")
    out = tmp_path / "sweep"
    args = ["--weight-bits", "4", "--activation-bits", "8", "--limit", "64", "--calib-batches", "1",
            "--calib-batch-size", "32", "--batch-size", "64", "--output", str(out)]  # fmt: skip
    assert main(["sweep", str(tiny_checkpoint), *args, "--layer-bits", str(path)]) == 0, capsys.readouterr().err
    assert "3 cell(s) evaluated, 0 resumed" in capsys.readouterr().out  # FP32, W4A8 and the plan
    rows = read_results(out / "results.jsonl").rows
    mixed = [r for r in rows if r.get("layer_bits")]
    assert len(rows) == 3 and len(mixed) == 1
    row = mixed[0]
    assert row["label"] == "mixed per_channel minmax from search-a/layer_bits.yaml"
    assert row["simulation"] == "integer-exact" and row["layer_bits"] == str(path.resolve())
    # evaluated like the grid's cells, with exactly the config 'quantize --layer-bits' builds
    cell = Cell.from_dict(row)
    assert cell.cell_id == row["cell_id"]
    assert quant_config_for(cell) == plan.to_quant_config(QuantConfig.from_bits(8, 8))
    info, _ = read_header(row["packed_file"])
    assert {name: info["specs"][si]["bits"] for name, si, *_ in info["weight_layers"]} == dict(plan.weights)
    assert row["size_bytes"] == os.path.getsize(row["packed_file"])
    assert packed_breakdown(row["packed_file"]).dtypes["weights.scale"] == "F16"  # the plan's scale storage
    assert row["label"] in (out / "report.md").read_text()
    # resumable: the same command redoes nothing; an edited plan is a new cell, not a stale resumed one
    assert main(["sweep", str(tiny_checkpoint), *args, "--layer-bits", str(path), "--no-report"]) == 0
    assert "0 cell(s) evaluated, 3 resumed" in capsys.readouterr().out
    edited = LayerBits(8, 8, {**plan.weights, names.weights[0]: 8}, plan.activations)
    assert plan_cell(path, edited).cell_id != cell.cell_id == plan_cell(path, plan).cell_id
    # a name the model lacks is one line before any cell runs
    save_layer_bits(LayerBits(4, 8, {"features.1.conv.0.O": 2}), path)
    s2 = tmp_path / "s2"
    assert main(["sweep", str(tiny_checkpoint), *args[:-1], str(s2), "--layer-bits", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no weight layer named 'features.1.conv.0.O'" in err and len(err.strip().splitlines()) == 1
    assert not (s2 / "results.jsonl").exists()
