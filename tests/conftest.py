"""Shared fixtures: small datasets every package's tests can train and quantize on quickly."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from bitsweep.config import DataConfig
from bitsweep.data import DatasetSplits, load_dataset


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
def digits_splits() -> DatasetSplits:
    """scikit-learn's digits (10 classes, 1x8x8; 1137/300/360 images), split with seed 0."""
    return load_dataset(DataConfig(name="digits"), seed=0)
