"""A tiny trained checkpoint (MobileNet-v2 width 0.25 on the synthetic data) for end-to-end sweep tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsweep.config import DataConfig, ModelConfig, RunConfig, TrainConfig, to_dict
from bitsweep.data import TensorLoader, load_dataset
from bitsweep.models import create_model
from bitsweep.training import save_checkpoint


def make_checkpoint(path: Path, steps: int = 0, seed: int = 0) -> Path:
    """Save a width-0.25 MobileNet-v2 checkpoint for the synthetic data, trained for ``steps`` SGD steps.

    The default (0 steps, freshly initialized weights) is enough for the sweep's
    plumbing and size checks and costs nothing on a busy CPU; accuracies are
    then near chance, and the tests only check their ranges.
    """
    torch.manual_seed(seed)
    config = RunConfig(
        data=DataConfig(name="synthetic"),
        model=ModelConfig(name="mobilenetv2", width=0.25, dropout=0.0),
        train=TrainConfig(epochs=1, batch_size=50, tensorboard=False),
        seed=seed,
        device="cpu",
    )
    splits = load_dataset(config.data, seed=seed)
    model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = TensorLoader(splits.train, 50, mean=splits.mean, std=splits.std, shuffle=True, seed=seed)
    model.train()
    step = epoch = 0
    while step < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    model.eval()
    save_checkpoint(
        path,
        {
            "config": to_dict(config),
            "dataset": splits.meta(),
            "model_state": model.state_dict(),
            "epoch": 1,
            "metrics": {"steps": steps},
        },
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny trained checkpoint shared by the session's tests."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second checkpoint (different seed, so different bytes) for mismatched-resume tests."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt2") / "best.pt", seed=1)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint after 60 SGD steps: FP32 near 100 % on the synthetic data, 1-bit cells at chance."""
    return make_checkpoint(tmp_path_factory.mktemp("trained") / "best.pt", steps=60)
