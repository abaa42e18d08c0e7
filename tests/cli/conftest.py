"""Fixtures of the CLI tests: one thread, and a tiny untrained checkpoint on the synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bitsweep.config import DataConfig, ModelConfig, RunConfig, to_dict
from bitsweep.data import load_dataset
from bitsweep.models import create_model
from bitsweep.runtime import torch_threads
from bitsweep.training import save_checkpoint


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids waiting on a busy second core."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained width-0.25 MobileNet-v2 on the synthetic data (3x16x16; 500/100/200 images)."""
    config = RunConfig(data=DataConfig(name="synthetic"), model=ModelConfig(width=0.25))
    splits = load_dataset(config.data)
    torch.manual_seed(0)
    model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"config": to_dict(config), "dataset": splits.meta(), "model_state": model.state_dict(),
                           "epoch": 1, "metrics": {}})  # fmt: skip
    return path
