"""Tiny data and configs so that every training test runs in seconds on a shared CPU."""

from __future__ import annotations

import pytest

from bitsweep.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from bitsweep.data import DatasetSplits
from bitsweep.runtime import torch_threads


@pytest.fixture(scope="session")
def tiny_splits(cut_splits) -> DatasetSplits:
    """The synthetic dataset cut to 96 train / 48 val / 48 test images."""
    return cut_splits(96, 48, 48)


def _tiny_config(tmp_path, epochs: int = 3, **train: object) -> RunConfig:
    """VGG-16 at width 0.125 (the fastest registered model on CPU) with crop+flip augmentation."""
    return RunConfig(
        data=DataConfig(name="synthetic", augment=AugmentConfig(crop_padding=2, hflip=True)),
        model=ModelConfig(name="vgg16", width=0.125, dropout=0.1),
        train=TrainConfig(
            epochs=epochs, batch_size=32, lr=0.05, warmup_epochs=1, eval_batch_size=64, tensorboard=False, **train
        ),  # type: ignore[arg-type]
        seed=3,
        device="cpu",
        output_dir=str(tmp_path),
    )


@pytest.fixture(scope="session")
def tiny_config():
    """Factory ``tiny_config(tmp_path, epochs=3, **train_options) -> RunConfig``."""
    return _tiny_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core CI box, OpenMP thread sync under contention
    makes small kernels up to 100x slower, and tests here are latency-bound anyway."""
    with torch_threads(1):
        yield
