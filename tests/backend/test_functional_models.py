"""A MobileNet-v2 written with functional ops lowers, packs and exports like the registered one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backend.functional_models import functional_mobilenet
from bitsweep.artifacts import ModelRecord, PackedMeta, load_packed, save_packed
from bitsweep.backend.intref import compare
from bitsweep.backend.lowering import lower
from bitsweep.quant import QuantConfig, ptq


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _converted(pool: str, w: int = 4, a: int = 8) -> tuple[nn.Module, ModelRecord, QuantConfig]:
    model = functional_mobilenet(pool)
    record = ModelRecord.of(model, num_classes=10, in_channels=1, image_size=(8, 8), mean=(0.5,), std=(0.25,),
                            options={"pool": pool})  # fmt: skip
    config = QuantConfig.from_bits(w, a)
    return ptq(model, config, [_images(8, 0), _images(8, 2)]).model, record, config


@pytest.mark.parametrize("pool", ["mean", "adaptive"])
def test_integer_reference_equals_simulation(pool: str) -> None:
    model, _, _ = _converted(pool)
    steps = [type(s).__name__ for s in lower(model, _images(1)).steps]
    assert steps.count("AddGrids") == 2  # the `x + conv(x)` and the torch.add residuals
    assert steps.count("PoolSum") == 1 and steps.count("QuantizeInput") == 1
    agreement = compare(model, [_images()])
    assert agreement.max_logit_diff == 0.0 and agreement.top1_agreement == 100.0
    assert agreement.fakequant_max_logit_diff < 0.05  # and the fake-quant model is computing the same thing


def test_packed_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model, record, config = _converted("mean", 3, 8)
    info = save_packed(model, tmp_path / "m.safetensors", PackedMeta(record, config))
    loaded, _ = load_packed(info.path)
    x = _images(5)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert compare(loaded, [x]).max_logit_diff == 0.0


def test_onnx_export_runs_in_onnxruntime_and_agrees(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from bitsweep.export.onnx import export_onnx

    model, _, _ = _converted("adaptive", 8, 8)
    path = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))
    x = _images(16)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic as written
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        sim = model(x).numpy()
    assert (sim.argmax(1) == got.argmax(1)).mean() >= 0.9
    assert np.median(np.abs(sim - got)) < 1e-6 and np.abs(sim - got).max() < 0.1 * float(np.std(sim))
