"""Fixtures of the QAT tests: one thread, tiny data, and a briefly trained float checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bitsweep.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from bitsweep.data import DatasetSplits
from bitsweep.runtime import torch_threads
from bitsweep.training import fit


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids waiting on a busy second core."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def qat_splits(cut_splits) -> DatasetSplits:
    """The synthetic dataset (3x16x16, 10 classes) cut to 128 train / 48 val / 64 test images."""
    return cut_splits(128, 48, 64)


@pytest.fixture(scope="session")
def float_checkpoint(tmp_path_factory: pytest.TempPathFactory, qat_splits: DatasetSplits) -> Path:
    """A width-0.25 MobileNet-v2 trained for 2 epochs on :func:`qat_splits` (residual adds, depthwise, ReLU6)."""
    tmp = tmp_path_factory.mktemp("float")
    config = RunConfig(
        data=DataConfig(name="synthetic"),
        model=ModelConfig(name="mobilenetv2", width=0.25),
        train=TrainConfig(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, eval_batch_size=64, tensorboard=False),
        seed=0,
        device="cpu",
        output_dir=str(tmp),
    )
    with torch_threads(1):
        torch.manual_seed(0)
        return fit(config, run_dir=tmp / "run", splits=qat_splits, progress=False).best_checkpoint
