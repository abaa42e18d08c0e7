"""fit(): the run directory, exact resume after an interruption, and refused resumes."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from bitsweep.config import ModelConfig
from bitsweep.data import DatasetSplits
from bitsweep.errors import BitsweepError
from bitsweep.models import create_model
from bitsweep.training import fit, load_checkpoint, load_model


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_splits: DatasetSplits, tiny_config):
    """One uninterrupted 3-epoch run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("full")
    config = tiny_config(tmp)
    return config, fit(config, run_dir=tmp / "run", splits=tiny_splits, progress=False)


def test_run_directory_is_complete(full_run) -> None:
    config, result = full_run
    run = result.run_dir
    for name in ("config.yaml", "environment.json", "metrics.csv", "metrics.jsonl", "best.pt", "last.pt",
                 "curves.png", "eval.json"):  # fmt: skip
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "vgg16"
    assert json.loads((run / "environment.json").read_text())["torch"] == torch.__version__
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] == [r["epoch"] for r in result.metrics]
    with open(run / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in csv_rows] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "epoch_seconds",
                "train_images_per_s"):  # fmt: skip
        assert key in csv_rows[0]
    assert rows[0]["lr"] < rows[1]["lr"]  # still warming up during epoch 1
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["test"]["top1"] == pytest.approx(result.test.top1)
    assert evaluation["test"]["images"] == 48 and evaluation["val"]["images"] == 48


def test_best_checkpoint_is_the_best_validation_epoch(full_run) -> None:
    _, result = full_run
    best_epoch = max(result.metrics, key=lambda r: r["val_top1"])["epoch"]
    best = load_checkpoint(result.best_checkpoint)
    assert best["epoch"] == best_epoch
    assert "optimizer" not in best  # only last.pt carries resume state
    last = load_checkpoint(result.last_checkpoint)
    assert last["epoch"] == 3 and {"optimizer", "scheduler", "rng"} <= set(last)
    model, info = load_model(result.best_checkpoint)
    assert info.epoch == best_epoch and info.num_classes == 10 and info.model.name == "vgg16"
    assert result.val.top1 == pytest.approx(max(r["val_top1"] for r in result.metrics))


def test_learning_happens(full_run) -> None:
    _, result = full_run
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]


def test_resume_after_interruption_is_bitwise_identical(tmp_path: Path, full_run, tiny_splits, interrupt_after) -> None:
    config, reference = full_run
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(config, run_dir=run, splits=tiny_splits, callbacks=[interrupt_after(1)], progress=False)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    resumed = fit(config, resume=run, splits=tiny_splits, progress=False)
    assert resumed.run_dir == run
    want = load_checkpoint(reference.last_checkpoint)["model_state"]
    got = load_checkpoint(resumed.last_checkpoint)["model_state"]
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    keys = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_top1")
    assert [{k: r[k] for k in keys} for r in resumed.metrics] == [{k: r[k] for k in keys} for r in reference.metrics]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_into_another_architecture_is_refused(full_run) -> None:
    config, result = full_run
    other = dataclasses.replace(config, model=ModelConfig(name="resnet20", width=0.125))
    with pytest.raises(BitsweepError, match="holds model vgg16.*but model resnet20 was expected"):
        fit(other, resume=result.run_dir, progress=False)


def test_resume_with_another_schedule_is_refused(full_run) -> None:
    config, result = full_run
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=5))
    with pytest.raises(BitsweepError, match=r"train.epochs: 3 -> 5"):
        fit(longer, resume=result.run_dir, progress=False)


def test_resume_from_best_is_refused(full_run) -> None:
    config, result = full_run
    with pytest.raises(BitsweepError, match="no optimizer state"):
        fit(config, resume=result.best_checkpoint, progress=False)


def test_a_passed_model_is_trained_with_a_custom_loss(tmp_path: Path, tiny_splits, tiny_config) -> None:
    """fit(model=..., loss_fn=...): that model object is trained with that loss, and its checkpoints restore it."""
    config = tiny_config(tmp_path, epochs=1)
    torch.manual_seed(0)
    # Not what the config builds (width 0.125): the same registry model at other layer shapes.
    model = create_model("vgg16", tiny_splits.num_classes, tiny_splits.in_channels, width=0.25, dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[int, ...]] = []

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(images.shape))
        return F.cross_entropy(logits, targets) + 0.01 * logits.pow(2).mean()

    result = fit(config, run_dir=tmp_path / "run", splits=tiny_splits, progress=False, model=model, loss_fn=loss_fn)
    assert calls == [(32, tiny_splits.in_channels, *tiny_splits.image_size)] * 3  # 96 images, batches of 32
    best = load_checkpoint(result.best_checkpoint)
    state = model.state_dict()
    assert best["model_state"].keys() == state.keys()
    assert all(torch.equal(best["model_state"][k], state[k].cpu()) for k in state)  # the passed model, trained
    assert any(not torch.equal(before[k], state[k].cpu()) for k in state)
    restored, info = load_model(result.best_checkpoint)
    assert info.model.name == "vgg16"
    assert all(torch.equal(restored.state_dict()[k], state[k].cpu()) for k in state)  # rebuilt at width 0.25


def test_loss_without_images_and_default_loss_match(tmp_path: Path, tiny_splits, tiny_config) -> None:
    """A two-argument loss gets (logits, targets); the label-smoothed default gives the same run as passing it."""
    config = tiny_config(tmp_path, epochs=1)
    smoothing = config.train.label_smoothing
    default = fit(config, run_dir=tmp_path / "a", splits=tiny_splits, progress=False)
    explicit = fit(config, run_dir=tmp_path / "b", splits=tiny_splits, progress=False,
                   loss_fn=nn.CrossEntropyLoss(label_smoothing=smoothing))  # fmt: skip
    assert default.metrics[0]["train_loss"] == explicit.metrics[0]["train_loss"]
    a, b = load_checkpoint(default.last_checkpoint), load_checkpoint(explicit.last_checkpoint)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
