"""Checkpoint files: round trip, safe loading, and one clear error for every bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from bitsweep.config import DataConfig, ModelConfig, RunConfig, to_dict
from bitsweep.errors import BitsweepError
from bitsweep.models import create_model
from bitsweep.training import load_checkpoint, load_model, save_checkpoint


def _write(path: Path, name: str = "resnet20", classes: int = 10) -> torch.nn.Module:
    config = RunConfig(data=DataConfig(name="digits"), model=ModelConfig(name=name, width=0.25, dropout=0.0))
    model = create_model(name, num_classes=classes, in_channels=1, width=0.25, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    dataset = {"name": "digits", "num_classes": classes, "in_channels": 1, "image_size": [8, 8],
               "mean": [0.3], "std": [0.4]}  # fmt: skip
    save_checkpoint(path, {"config": to_dict(config), "dataset": dataset, "model_state": model.state_dict(),
                           "epoch": 4, "metrics": {"val_top1": 91.5}})  # fmt: skip
    return model


def test_round_trip_restores_identical_weights(tmp_path: Path) -> None:
    original = _write(tmp_path / "best.pt")
    model, info = load_model(tmp_path / "best.pt")
    assert not model.training
    for (k, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert info.model.name == "resnet20" and info.num_classes == 10 and info.in_channels == 1
    assert info.image_size == (8, 8) and info.mean == (0.3,) and info.std == (0.4,)
    assert info.epoch == 4 and info.metrics["val_top1"] == 91.5 and info.data.name == "digits"
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), original.eval()(x))


def test_run_directory_resolves_to_its_checkpoint(tmp_path: Path) -> None:
    _write(tmp_path / "best.pt")
    assert load_checkpoint(tmp_path)["epoch"] == 4


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BitsweepError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_file(tmp_path: Path) -> None:
    _write(tmp_path / "best.pt")
    data = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BitsweepError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(BitsweepError, match="corrupt"):
        load_checkpoint(tmp_path / "text.pt")


def test_not_a_bitsweep_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(BitsweepError, match="not a bitsweep checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"format": "bitsweep-checkpoint", "version": 1, "x": _Evil()}, tmp_path / "evil.pt",
               pickle_module=pickle)  # fmt: skip
    with pytest.raises(BitsweepError, match="corrupt or was not written by bitsweep"):
        load_checkpoint(tmp_path / "evil.pt")


def test_other_architecture_or_class_count_is_one_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "best.pt", name="resnet20", classes=10)
    with pytest.raises(BitsweepError, match="holds model resnet20.*but model vgg16 was expected"):
        load_model(tmp_path / "best.pt", expect_model="vgg16")
    with pytest.raises(BitsweepError, match="holds 10 classes.*but 100 classes was expected"):
        load_model(tmp_path / "best.pt", expect_num_classes=100)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    _write(tmp_path / "best.pt")
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    state["config"]["model"]["width"] = 0.5
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(BitsweepError, match="does not match its own resnet20 config"):
        load_model(tmp_path / "bad.pt")
