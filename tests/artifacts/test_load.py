"""One restore path: float checkpoint, quantized checkpoint and packed file give identical logits,
for a pruned MobileNet-v2 and a user's own nn.Module; damaged weights are refused at load."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.artifacts import (
    ModelRecord,
    PackedMeta,
    load,
    quantized_state,
    save_checkpoint,
    save_packed,
    save_quantized,
)
from bitsweep.config import DataConfig, ModelConfig, RunConfig, to_dict
from bitsweep.errors import BitsweepError
from bitsweep.models import create_model
from bitsweep.quant import QuantConfig, ptq

from .test_record import pruned_model, user_model

MODELS: dict[str, Callable[[], tuple[nn.Module, ModelRecord]]] = {"pruned": pruned_model, "user": user_model}


@pytest.mark.parametrize("which", sorted(MODELS))
def test_float_quantized_and_packed_round_trip_exactly(which: str, tmp_path: Path) -> None:
    model, record = MODELS[which]()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    save_checkpoint(
        tmp_path / "f.pt",
        {
            "model_state": model.state_dict(),
            "model_record": record.to_dict(),
            "epoch": 2,
            "metrics": {"val_top1": 50.0},
        },
    )
    fl = load(tmp_path / "f.pt")
    assert fl.kind == "float" and fl.record == record and fl.quant_config is None and fl.meta["epoch"] == 2
    with torch.no_grad():
        assert torch.equal(fl.model(x), model(x))

    config = QuantConfig.from_bits(4, 8)
    result = ptq(copy.deepcopy(model), config, [torch.randn(8, 1, 8, 8) for _ in range(2)])
    qmodel = result.model
    save_quantized(tmp_path / "q.pt", quantized_state(qmodel, config, {}, result.summary, record))
    packed = save_packed(qmodel, tmp_path / "q.safetensors", PackedMeta(record, config, {"note": which}))
    with torch.no_grad():
        want = qmodel(x)
    for path, kind in ((tmp_path / "q.pt", "quantized"), (packed.path, "packed")):
        got = load(path)
        assert got.kind == kind and got.record == record and got.quant_config == config
        with torch.no_grad():
            assert torch.equal(got.model(x), want), kind
    assert load(packed.path).meta == {"note": which}


def test_old_checkpoint_without_record_derives_it(tmp_path: Path) -> None:
    model = create_model("resnet20", 10, 1, width=0.25).eval()
    config = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(name="resnet20", width=0.25, dropout=0.0))
    dataset = {"name": "digits", "num_classes": 10, "in_channels": 1, "image_size": [8, 8], "mean": [0.3], "std": [0.4]}
    save_checkpoint(
        tmp_path / "last.pt", {"config": to_dict(config), "dataset": dataset, "model_state": model.state_dict()}
    )
    loaded = load(tmp_path)  # a run directory resolves to its checkpoint
    assert loaded.record == ModelRecord("resnet20", 10, 1, (8, 8), (0.3,), (0.4,), {"width": 0.25, "dropout": 0.0})
    assert loaded.data is not None and loaded.data.name == "digits" and loaded.seed == config.seed
    with pytest.raises(BitsweepError, match="is a float model file, but a quantized one is needed"):
        load(tmp_path / "last.pt", expect="quantized")


def _damage(state: dict[str, torch.Tensor], key: str, values: list[float]) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state.items()}
    flat = state[key].view(-1)
    flat[: len(values)] = torch.tensor(values)
    return state


def test_non_finite_weights_are_refused_in_every_format(tmp_path: Path) -> None:
    model, record = pruned_model()
    key = "features.3.conv.0.0.weight"
    bad = _damage(model.state_dict(), key, [float("nan"), float("nan")])
    save_checkpoint(tmp_path / "f.pt", {"model_state": bad, "model_record": record.to_dict()})
    with pytest.raises(BitsweepError) as e:
        load(tmp_path / "f.pt")
    assert str(e.value) == (
        f"layer {key} has 2 NaN values; the checkpoint is damaged or training diverged; "
        "retrain or pick an earlier checkpoint"
    )

    config = QuantConfig.from_bits(4, 8)
    result = ptq(copy.deepcopy(model), config, [torch.randn(8, 1, 8, 8)])
    state = quantized_state(result.model, config, {}, result.summary, record)
    scale_key = next(k for k in state["model_state"] if k.endswith("weight_quantizer.scale"))
    state["model_state"] = _damage(state["model_state"], scale_key, [float("inf")])
    save_quantized(tmp_path / "q.pt", state)
    with pytest.raises(BitsweepError, match=rf"layer {scale_key} has 1 infinite values"):
        load(tmp_path / "q.pt")

    layer = dict(result.model.named_modules())["classifier.1"]
    with torch.no_grad():
        layer.bias[0] = float("nan")
    path = save_packed(result.model, tmp_path / "q.safetensors", PackedMeta(record, config)).path
    with pytest.raises(BitsweepError, match="layer classifier.1.bias has 1 NaN values; the model file is damaged"):
        load(path)
