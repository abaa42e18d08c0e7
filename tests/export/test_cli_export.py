"""``bitsweep export`` end to end on a quantized checkpoint of a tiny digits model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.artifacts import load, load_packed, read_header
from bitsweep.artifacts.quantized import quantized_state
from bitsweep.cli import main
from bitsweep.config import DataConfig, ModelConfig, RunConfig, to_dict
from bitsweep.measure.summary import describe_compression
from bitsweep.models import create_model
from bitsweep.quant import QuantConfig, ptq
from bitsweep.runtime import available_cores
from bitsweep.search import LayerBits, layer_names, save_layer_bits


@pytest.fixture(scope="module")
def qcheckpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10, 1, width=0.25).eval()
    config = QuantConfig.from_bits(4, 8)
    summary = ptq(model, config, [torch.randn(16, 1, 8, 8) for _ in range(2)]).summary
    run = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(width=0.25))
    source = {"format": "bitsweep-checkpoint", "config": to_dict(run), "version": 1, "epoch": 0, "metrics": {},
              "dataset": {"name": "digits", "num_classes": 10, "in_channels": 1, "image_size": [8, 8],
                          "mean": [0.3], "std": [0.4]}}  # fmt: skip
    path = tmp_path_factory.mktemp("ck") / "best-w4a8.pt"
    torch.save(quantized_state(model, config, source, summary), path)
    return path, model


def test_load_quantized_reproduces_logits(qcheckpoint: tuple[Path, nn.Module]) -> None:
    path, model = qcheckpoint
    loaded = load(path)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.kind == "quantized" and loaded.quant_config == QuantConfig.from_bits(4, 8)
    assert loaded.record.options["width"] == 0.25 and loaded.record.image_size == (8, 8)


def test_export_packed(qcheckpoint: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, model = qcheckpoint
    out = tmp_path / "m.safetensors"
    assert main(["export", str(path), "--format", "packed", "--output", str(out), "--batch-size", "64",
                 "--check-batches", "1"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "reloaded logits identical" in text and "model compression" in text
    record = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert record["compression"]["packed_file_bytes"] == out.stat().st_size
    assert record["integer_reference"]["top1_agreement"] == 100.0
    assert record["integer_reference"]["max_logit_diff"] == 0.0  # the integer simulation is exact
    loaded, _ = load_packed(out)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_export_onnx(qcheckpoint: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = qcheckpoint
    out = tmp_path / "m.onnx"
    assert main(["export", str(path), "--format", "onnx", "--output", str(out), "--batch-size", "64",
                 "--check-batches", "1"]) == 0  # fmt: skip
    assert out.stat().st_size > 0 and "onnxruntime vs fake-quant simulation" in capsys.readouterr().out


def test_user_errors_are_one_line(qcheckpoint: tuple[Path, nn.Module], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path, _ = qcheckpoint
    assert main(["export", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["export", str(path), "--weight-bits", "4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["export", str(path), "--output", str(path)]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "corrupt" in err


def test_describe_compression_for_quantize(qcheckpoint: tuple[Path, nn.Module]) -> None:
    path, model = qcheckpoint
    state = torch.load(path, weights_only=True)
    text = describe_compression(model, QuantConfig.from_bits(4, 8), state["source"])
    assert "model compression" in text and "activation compression" in text and "MB" in text
    assert "unavailable" in describe_compression(model, QuantConfig.from_bits(4, 8), {})


def test_export_onnx_int8_is_qop_with_check_and_latency(
    qcheckpoint: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = qcheckpoint
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(path), "--format", "onnx", "--int8", "--output", str(out), "--batch-size", "32",
                 "--check-batches", "1", "--latency-runs", "2"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "QOperator int8" in text and "vs integer-exact simulation" in text and "intra-op threads" in text
    record = json.loads((tmp_path / "m.int8.onnx.json").read_text())["onnx_qop"]
    cores = available_cores()  # batch 1 on one thread, batches on every available core
    assert {(r["model"], r["batch"], r["threads"]) for r in record["latency"]} == {
        ("FP32", 1, 1), ("int8", 1, 1), ("FP32", 64, cores), ("int8", 64, cores)}  # fmt: skip
    assert "batch   1, 1 thread :" in text and f"batch  64, {cores} thread" in text
    assert record["settings"]["graph_optimization"] == "ORT_ENABLE_ALL" and record["check"]["top1_agreement"] >= 90
    assert record["settings"]["intra_op_threads"] == 0  # auto


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory: pytest.TempPathFactory, write_untrained_checkpoint) -> Path:
    """An untrained width-0.25 MobileNet-v2 on the synthetic data (calibration needs its dataset)."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("float"))


def test_export_with_layer_bits_packs_and_exports_the_plans_bits(
    float_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = layer_names(load(float_checkpoint).model)
    plan = LayerBits.explicit({n: (2, 4, 8)[i % 3] for i, n in enumerate(names.weights)}, activation_bits=8)
    plan = LayerBits(plan.weight_bits, 8, plan.weights, {names.activations[1]: 6})
    path = save_layer_bits(plan, tmp_path / "layer_bits.yaml")
    fast = ["--calib-batches", "1", "--batch-size", "32", "--check-batches", "1"]
    out = tmp_path / "m.safetensors"
    assert main(["export", str(float_checkpoint), "--layer-bits", str(path), "--output", str(out), *fast]) == 0
    assert "reloaded logits identical" in capsys.readouterr().out
    info, _ = read_header(out)
    bits = {name: info["specs"][si]["bits"] for name, si, *_ in info["weight_layers"]}
    assert bits == dict(plan.weights)
    acts = {name: info["specs"][si]["bits"] for name, si in info["activation_quantizers"]}
    assert {b for n, b in acts.items() if n.startswith(names.activations[1] + ".")} == {6}
    assert load(out).quant_config == plan.to_quant_config(QuantConfig.from_bits(8, 8))
    onnx_out = tmp_path / "m.onnx"
    assert main(["export", str(float_checkpoint), "--layer-bits", str(path), "--format", "onnx", "--output",
                 str(onnx_out), *fast]) == 0  # fmt: skip
    assert "onnxruntime vs fake-quant simulation" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.onnx.json").read_text())["onnx_check"]["top1_agreement"] >= 90


def test_export_layer_bits_errors_are_one_line(
    float_checkpoint: Path, qcheckpoint: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = save_layer_bits(LayerBits(4, 8, {"features.1.conv.0.O": 2}), tmp_path / "typo.yaml")
    out = tmp_path / "m.safetensors"
    for argv, message in (
        ([str(float_checkpoint), "--layer-bits", str(plan), "--weight-bits", "4"], "drop --weight-bits"),
        ([str(float_checkpoint), "--layer-bits", str(plan)], "no weight layer named 'features.1.conv.0.O'"),
        ([str(qcheckpoint[0]), "--layer-bits", str(plan)], "already quantized"),
        ([str(float_checkpoint), "--layer-bits", str(tmp_path / "nope.yaml")], "cannot read layer-bits file"),
    ):
        assert main(["export", *argv, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not out.exists()
