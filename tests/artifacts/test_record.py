"""The model record: JSON round trip, type checks, and rebuilding pruned and user-defined models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsweep.artifacts import ModelRecord, check_finite
from bitsweep.errors import BitsweepError
from bitsweep.models import create_model

GEOMETRY = {"num_classes": 10, "in_channels": 1, "image_size": (8, 8), "mean": (0.5,), "std": (0.25,)}


class TinyNet(nn.Module):
    """A user's own model, outside the registry: built from a 'module:callable' factory with JSON kwargs."""

    def __init__(self, channels: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU6())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _keep(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    return t.index_select(dim, idx).clone()


@torch.no_grad()
def prune_mobilenet(model: nn.Module) -> nn.Module:
    """Remove hidden channels of block 2 (expand conv, depthwise conv, their BNs, the projection's inputs)
    and output channels of the last 1x1 conv (its BN and the classifier's inputs), as a pruning tool would."""
    block = model.features[2].conv
    hidden = torch.arange(0, block[0][0].out_channels, 2)  # keep every other hidden channel: 48 -> 24
    expand, dw, project = block[0][0], block[1][0], block[2][0]
    new_expand = nn.Conv2d(expand.in_channels, len(hidden), 1, bias=False)
    new_expand.weight.copy_(_keep(expand.weight, hidden, 0))
    new_dw = nn.Conv2d(len(hidden), len(hidden), 3, padding=1, groups=len(hidden), bias=False)
    new_dw.weight.copy_(_keep(dw.weight, hidden, 0))
    new_project = nn.Conv2d(len(hidden), project.out_channels, 1, bias=False)
    new_project.weight.copy_(_keep(project.weight, hidden, 1))
    block[0][0], block[1][0], block[2][0] = new_expand, new_dw, new_project
    for i in (0, 1):
        block[i][1] = _pruned_bn(block[i][1], hidden)
    last = model.features[18]
    keep = torch.arange(0, last[0].out_channels - 280)  # 1280 -> 1000
    conv = nn.Conv2d(last[0].in_channels, len(keep), 1, bias=False)
    conv.weight.copy_(_keep(last[0].weight, keep, 0))
    last[0], last[1] = conv, _pruned_bn(last[1], keep)
    fc = model.classifier[1]
    new_fc = nn.Linear(len(keep), fc.out_features)
    new_fc.weight.copy_(_keep(fc.weight, keep, 1))
    new_fc.bias.copy_(fc.bias)
    model.classifier[1] = new_fc
    return model


def _pruned_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx))
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data.copy_(_keep(getattr(bn, name), idx, 0))
    new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so folding and quantization see non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def pruned_model() -> tuple[nn.Module, ModelRecord]:
    torch.manual_seed(0)
    model = randomized(prune_mobilenet(create_model("mobilenetv2", 10, 1, width=0.25)))
    return model, ModelRecord.of(model, name="mobilenetv2", options={"width": 0.25}, **GEOMETRY)  # type: ignore[arg-type]


def user_model() -> tuple[nn.Module, ModelRecord]:
    torch.manual_seed(1)
    model = randomized(TinyNet(channels=6, classes=10))
    return model, ModelRecord.of(model, options={"channels": 6, "classes": 10}, **GEOMETRY)  # type: ignore[arg-type]


def test_pruned_record_stores_only_the_changed_shapes_and_rebuilds_them() -> None:
    model, record = pruned_model()
    assert record.shapes["features.2.conv.1.0.weight"] == (24, 1, 3, 3)
    assert record.shapes["classifier.1.weight"] == (10, 1000)
    assert "features.0.0.weight" not in record.shapes  # unchanged layers cost no header bytes
    rebuilt = record.build()
    dw = rebuilt.features[2].conv[1][0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (24, 24, 24)
    assert rebuilt.features[18][1].num_features == 1000 and rebuilt.classifier[1].in_features == 1000
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_user_factory_record_round_trips_through_json() -> None:
    model, record = user_model()
    assert record.factory == f"{TinyNet.__module__}:TinyNet" and record.name is None and record.shapes == {}
    again = ModelRecord.from_dict(record.to_dict())
    assert again == record
    rebuilt = again.build()
    assert isinstance(rebuilt, TinyNet) and rebuilt.stem[0].out_channels == 6


def test_bad_records_are_one_clear_error() -> None:
    good = pruned_model()[1].to_dict()
    for change in (
        {"num_classes": "10"},
        {"image_size": [8]},
        {"shapes": {"a": "x"}},
        {"mean": [float("nan")]},
        {"factory": "no_colon", "name": None},
        {"name": 3},
    ):
        with pytest.raises(BitsweepError, match="model record is invalid"):
            ModelRecord.from_dict({**good, **change})
    with pytest.raises(BitsweepError, match="model options must be JSON"):
        ModelRecord("mobilenetv2", options={"width": object()}, **GEOMETRY).to_dict()  # type: ignore[arg-type]
    with pytest.raises(BitsweepError, match="cannot import the model factory"):
        ModelRecord(None, factory="no_such_package.models:Net", **GEOMETRY).build()  # type: ignore[arg-type]
    with pytest.raises(BitsweepError, match="does not build this model"):
        ModelRecord.of(TinyNet(), name="mobilenetv2", options={"width": 0.25}, **GEOMETRY)  # type: ignore[arg-type]


def test_huge_record_is_refused_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    record = ModelRecord("mobilenetv2", **{**GEOMETRY, "num_classes": 200_000}, options={"width": 0.25})  # type: ignore[arg-type]
    monkeypatch.setattr(ModelRecord, "build", lambda self: pytest.fail("built before the size check"))
    with pytest.raises(BitsweepError, match="more than the file's data can hold"):
        record.check_size(1_000_000)


def test_non_finite_weights_name_the_layer() -> None:
    w = torch.zeros(4, 4)
    w[0, 0] = w[1, 1] = float("nan")
    with pytest.raises(BitsweepError) as e:
        check_finite({"features.0.weight": torch.zeros(3), "features.3.conv.0.weight": w})
    assert str(e.value) == (
        "layer features.3.conv.0.weight has 2 NaN values; the checkpoint is damaged or training "
        "diverged; retrain or pick an earlier checkpoint"
    )
    with pytest.raises(BitsweepError, match="layer b has 1 infinite values"):
        check_finite({"a": torch.ones(2, dtype=torch.int64), "b": torch.tensor([1.0, float("inf")])})
