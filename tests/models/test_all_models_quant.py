"""Every registered model quantizes, lowers (integer reference == simulation), packs and exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bitsweep.artifacts import ModelRecord, PackedMeta, load_packed, save_packed
from bitsweep.backend.intref import compare
from bitsweep.models import create_model, list_models
from bitsweep.quant import QuantConfig, calibrate, convert, quantize_

WIDTHS = {"mobilenetv2": 0.25, "resnet20": 0.25, "vgg16": 0.125}  # tiny, so each model takes about a second
SIZE = 16


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _converted(name: str, w: int, a: int) -> tuple[nn.Module, ModelRecord, QuantConfig]:
    torch.manual_seed(0)
    options = {"width": WIDTHS.get(name, 0.25)}
    model = create_model(name, 10, 1, **options).eval()
    for m in model.modules():  # random BN statistics (and no zero-initialised gammas), so folding does something
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    record = ModelRecord.of(model, num_classes=10, in_channels=1, image_size=(SIZE, SIZE), mean=(0.5,),
                            std=(0.25,), name=name, options=options)  # fmt: skip
    config = QuantConfig.from_bits(w, a)
    quantize_(model, config)
    calibrate(model, [_images(4, 0), _images(4, 1)], 2)
    return convert(model), record, config


def test_the_registry_is_covered() -> None:
    assert set(list_models()) <= set(WIDTHS)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(("w", "a"), [(4, 8), (2, 4)])
def test_integer_reference_equals_simulation_and_pack_round_trips(tmp_path: Path, name: str, w: int, a: int) -> None:
    model, record, config = _converted(name, w, a)
    x = _images(2, 2)
    agreement = compare(model, [x])
    assert agreement.max_logit_diff == 0.0 and agreement.top1_agreement == 100.0
    info = save_packed(model, tmp_path / "m.safetensors", PackedMeta(record, config))
    loaded, _ = load_packed(info.path)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("name", list_models())
def test_onnx_export_agrees_with_the_model(tmp_path: Path, name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    from bitsweep.export.onnx import export_onnx

    model, _, _ = _converted(name, 8, 8)
    path = export_onnx(model, tmp_path / "m.onnx", (1, SIZE, SIZE))
    x = _images(2, 3)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ arithmetic as written
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        sim = model(x).numpy()
    # Only QuantizeLinear's division (vs the reciprocal multiply) can differ, on rare ties.
    assert np.median(np.abs(sim - got)) < 1e-6 and np.abs(sim - got).max() < 0.1 * float(np.std(sim))
