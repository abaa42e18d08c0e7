"""Dataset names -> loaders: the one entry point :func:`load_dataset`."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from bitsweep.config import DataConfig
from bitsweep.data.cifar import load_cifar
from bitsweep.data.digits import load_digits_splits
from bitsweep.data.fashion_mnist import load_fashion_mnist
from bitsweep.data.synthetic import load_synthetic
from bitsweep.data.types import DatasetSplits
from bitsweep.errors import BitsweepError


def _cifar10(config: DataConfig, seed: int) -> DatasetSplits:
    return load_cifar(10, config.data_dir, config.download, config.val_size, seed)


def _cifar100(config: DataConfig, seed: int) -> DatasetSplits:
    return load_cifar(100, config.data_dir, config.download, config.val_size, seed)


def _fashion_mnist(config: DataConfig, seed: int) -> DatasetSplits:
    return load_fashion_mnist(config.data_dir, config.download, config.val_size, seed)


def _digits(config: DataConfig, seed: int) -> DatasetSplits:
    return load_digits_splits(config.val_size, seed)


def _synthetic(config: DataConfig, seed: int) -> DatasetSplits:
    return load_synthetic(config.val_size, seed)


# Immutable mapping (a tuple of pairs): no module-level mutable state.
_LOADERS: tuple[tuple[str, Callable[[DataConfig, int], DatasetSplits]], ...] = (
    ("cifar10", _cifar10),
    ("cifar100", _cifar100),
    ("fashion_mnist", _fashion_mnist),
    ("digits", _digits),
    ("synthetic", _synthetic),
)


def list_datasets() -> list[str]:
    """Names accepted by ``DataConfig.name``.

    >>> list_datasets()
    ['cifar10', 'cifar100', 'digits', 'fashion_mnist', 'synthetic']
    """
    return sorted(name for name, _ in _LOADERS)


def load_dataset(config: DataConfig, seed: int = 0) -> DatasetSplits:
    """Load the dataset ``config.name`` with a validation split held out of its training set.

    Args:
        config: Which dataset, where its files are, whether to download, the validation size.
        seed: Chooses which training images form the validation split; the test split never depends on it.

    Returns:
        The train/val/test splits as uint8 tensors plus the train-split normalization statistics.

    Raises:
        BitsweepError: Unknown name, missing or corrupted files, or a val_size that leaves no training images.
    """
    loaders = dict(_LOADERS)
    name = config.name.strip().lower().replace("-", "_")
    if name not in loaders:
        close = difflib.get_close_matches(name, list(loaders), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise BitsweepError(f"unknown dataset '{config.name}'{hint}; available: {', '.join(list_datasets())}")
    return loaders[name](config, seed)
