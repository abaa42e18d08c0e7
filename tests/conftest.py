"""Shared fixtures: small datasets every package's tests can train and quantize on quickly."""

from __future__ import annotations

import pytest

from bitsweep.config import DataConfig
from bitsweep.data import DatasetSplits, load_dataset


@pytest.fixture(scope="session")
def synthetic_splits() -> DatasetSplits:
    """The synthetic dataset (10 classes, 3x16x16; 500/100/200 images), split with seed 0."""
    return load_dataset(DataConfig(name="synthetic"), seed=0)


@pytest.fixture(scope="session")
def digits_splits() -> DatasetSplits:
    """scikit-learn's digits (10 classes, 1x8x8; 1137/300/360 images), split with seed 0."""
    return load_dataset(DataConfig(name="digits"), seed=0)
