"""ONNX QDQ export: onnxruntime agrees with the simulation; the file holds integer weights."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.export.onnx import check_onnx, export_onnx
from bitsweep.quant import QuantConfig
from bitsweep.quant.scale_dtype import apply_scale_dtype

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


def _images(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))]


def _exact_session(path: Path) -> ort.InferenceSession:
    """onnxruntime without graph fusion: runs the Q/DQ float arithmetic as written."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("weight_bits", "activation_bits"), [(8, 8), (4, 4), (3, 8), (8, 12)])
def test_qdq_graph_computes_the_simulated_grid(
    tmp_path: Path, quantized: QuantFactory, weight_bits: int, activation_bits: int
) -> None:
    model, _ = quantized(weight_bits, activation_bits)
    path = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))
    x = _images()[0][0]
    with torch.no_grad():
        sim = model(x).numpy()
    got = _exact_session(path).run(["logits"], {"input": x.numpy()})[0]
    # Only QuantizeLinear's division (vs the simulation's reciprocal multiply) can differ, on rare ties.
    assert (sim.argmax(1) == got.argmax(1)).mean() >= 0.97
    assert np.abs(sim - got).max() < 0.05 * float(np.std(sim))
    assert np.median(np.abs(sim - got)) < 1e-6  # typical logit differs only by float summation order


def test_w8a8_onnxruntime_accuracy_matches_simulation(tmp_path: Path, quantized: QuantFactory) -> None:
    model, _ = quantized(8, 8)
    check = check_onnx(export_onnx(model, tmp_path / "m.onnx", (1, 8, 8)), model, _images())
    assert check.images == 48 and check.top1_agreement >= 97.0
    assert abs(check.onnx_top1 - check.simulated_top1) <= 100.0 / 48 + 1e-9  # at most one image of 48


def test_weights_are_stored_as_integers_and_sub8_has_clip(tmp_path: Path, quantized: QuantFactory) -> None:
    model, _ = quantized(4, 4)
    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))))
    weights = [i for i in proto.graph.initializer if "_wq_" in i.name]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    assert all(np.abs(onnx.numpy_helper.to_array(i)).max() <= 7 for i in weights)
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4 for i in proto.graph.initializer)
    ops = [n.op_type for n in proto.graph.node]
    q_then_clip = sum(1 for a, b in zip(proto.graph.node, proto.graph.node[1:], strict=False)
                      if a.op_type == "QuantizeLinear" and b.op_type == "Clip")  # fmt: skip
    assert q_then_clip == ops.count("QuantizeLinear")  # every 4-bit quantizer is clamped to its grid


def test_int8_path_runs_integer_kernels(tmp_path: Path, quantized: QuantFactory) -> None:
    model, _ = quantized(8, 8)
    path = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8), int8=True)
    check = check_onnx(path, model, _images())
    assert check.top1_agreement >= 97.0
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops & {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"}, ops


def test_int8_refuses_wide_weights(tmp_path: Path, quantized: QuantFactory) -> None:
    model, _ = quantized(16, 8)
    with pytest.raises(BitsweepError, match="at most 8 bits"):
        export_onnx(model, tmp_path / "m.onnx", (1, 8, 8), int8=True)
    assert not (tmp_path / "m.onnx").exists()


def test_float16_rounded_scales_export_as_float32_and_compute_the_grid(tmp_path: Path, quantized: QuantFactory) -> None:
    model = apply_scale_dtype(copy.deepcopy(quantized(4, 8)[0]), "float16")
    path = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))
    scales = [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert scales  # ONNX scales stay float32; the weight scales among them hold float16 values
    x = _images()[0][0]
    with torch.no_grad():
        sim = model(x).numpy()
    got = _exact_session(path).run(["logits"], {"input": x.numpy()})[0]
    assert (sim.argmax(1) == got.argmax(1)).mean() >= 0.97
    assert np.median(np.abs(sim - got)) < 1e-6
