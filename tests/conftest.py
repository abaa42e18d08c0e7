"""Shared fixtures: small datasets and tiny quantized models every package's tests can use quickly."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.artifacts import ModelRecord
from bitsweep.config import DataConfig, ModelConfig, RunConfig, to_dict
from bitsweep.data import DatasetSplits, load_dataset
from bitsweep.models import create_model
from bitsweep.quant import QuantConfig, ptq
from bitsweep.training import save_checkpoint


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run every test, and every process a test starts, on one intra-op thread.

    The test models are tiny: a second OpenMP thread buys nothing and, on a
    busy 2-core machine, makes each small kernel wait for it (measured here:
    BatchNorm calls 100x slower). Subprocesses inherit OMP_NUM_THREADS.
    """
    old_threads, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="session")
def synthetic_splits() -> DatasetSplits:
    """The synthetic dataset (10 classes, 3x16x16; 500/100/200 images), split with seed 0."""
    return load_dataset(DataConfig(name="synthetic"), seed=0)


@pytest.fixture(scope="session")
def cut_splits(synthetic_splits: DatasetSplits) -> Callable[[int, int, int], DatasetSplits]:
    """Factory ``cut_splits(train, val, test)``: the first images of each synthetic split, for tests that train."""

    def cut(train: int, val: int, test: int) -> DatasetSplits:
        s = synthetic_splits
        return dataclasses.replace(s, train=s.train.subset(slice(0, train)), val=s.val.subset(slice(0, val)),
                                   test=s.test.subset(slice(0, test)))  # fmt: skip

    return cut


class InterruptAfter:
    """A training callback that raises KeyboardInterrupt after epoch ``after``, like Ctrl-C between epochs."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, epoch: int, row: dict) -> None:
        if epoch == self.after:
            raise KeyboardInterrupt


@pytest.fixture(scope="session")
def interrupt_after() -> type[InterruptAfter]:
    """The :class:`InterruptAfter` callback class (``interrupt_after(1)``), for resume-equality tests."""
    return InterruptAfter


def _write_untrained_checkpoint(folder: Path) -> Path:
    """Write ``folder/best.pt``: an untrained width-0.25 MobileNet-v2 on the synthetic data (3x16x16)."""
    config = RunConfig(data=DataConfig(name="synthetic"), model=ModelConfig(width=0.25))
    splits = load_dataset(config.data)
    torch.manual_seed(0)
    model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25).eval()
    path = folder / "best.pt"
    save_checkpoint(path, {"config": to_dict(config), "dataset": splits.meta(), "model_state": model.state_dict(),
                           "epoch": 1, "metrics": {}})  # fmt: skip
    return path


@pytest.fixture(scope="session")
def write_untrained_checkpoint() -> Callable[[Path], Path]:
    """Factory ``write_untrained_checkpoint(folder) -> folder/best.pt`` (CLI tests write beside it, so each
    module gives its own folder)."""
    return _write_untrained_checkpoint


@pytest.fixture(scope="session")
def digits_splits() -> DatasetSplits:
    """scikit-learn's digits (10 classes, 1x8x8; 1137/300/360 images), split with seed 0."""
    return load_dataset(DataConfig(name="digits"), seed=0)


# Tiny converted quantized models, shared by the measure and export tests.

ARCH = ModelRecord("mobilenetv2", 10, 1, (8, 8), (0.5,), (0.25,), {"width": 0.25})


def make_quantized(weight_bits: int, activation_bits: int | None = 8, seed: int = 0) -> tuple[nn.Module, QuantConfig]:
    """A width-0.25 MobileNet-v2 on 1x8x8 inputs, randomly initialised, calibrated on noise, converted."""
    torch.manual_seed(seed)
    model = create_model("mobilenetv2", 10, 1, width=0.25).eval()
    # Random BN statistics so folding produces non-trivial weights and biases.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    config = QuantConfig.from_bits(weight_bits, activation_bits)
    g = torch.Generator().manual_seed(seed)
    model = ptq(model, config, [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]).model
    return model, config


@pytest.fixture(scope="session")
def quantized() -> Callable[..., tuple[nn.Module, QuantConfig]]:
    """Factory fixture ``quantized(weight_bits, activation_bits)``; one model per widths per session (read-only use)."""
    cache: dict[tuple[int, int | None], tuple[nn.Module, QuantConfig]] = {}

    def get(weight_bits: int, activation_bits: int | None = 8) -> tuple[nn.Module, QuantConfig]:
        key = (weight_bits, activation_bits)
        if key not in cache:
            cache[key] = make_quantized(weight_bits, activation_bits)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def arch() -> ModelRecord:
    """The model record of :func:`make_quantized` models."""
    return ARCH
