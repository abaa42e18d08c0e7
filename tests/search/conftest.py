"""A tiny MobileNet-v2 on 1x28x28 inputs, its record and a few random batches, shared by the search tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bitsweep.artifacts import ModelRecord, PackedMeta
from bitsweep.models.registry import create_model
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.api import CalibrationStats
from bitsweep.search.cost import PackedLayout, layout_of
from bitsweep.search.layer_bits import LayerNames, layer_names


@dataclass(frozen=True)
class Tiny:
    model: nn.Module
    record: ModelRecord
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    names: LayerNames
    stats: CalibrationStats
    layout: PackedLayout


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    torch.manual_seed(0)
    model = create_model("mobilenetv2", num_classes=10, in_channels=1, width=0.25).eval()
    for m in model.modules():  # non-trivial BN statistics, so folding changes weights and biases
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    record = ModelRecord.of(model, name="mobilenetv2", options={"width": 0.25}, num_classes=10, in_channels=1,
                            image_size=(28, 28), mean=(0.5,), std=(0.5,))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    reference = ptq(copy.deepcopy(model), QuantConfig(), batches)
    layout = layout_of(reference.model, PackedMeta(record, reference.config))
    return Tiny(model, record, batches, layer_names(model), reference.stats, layout)
