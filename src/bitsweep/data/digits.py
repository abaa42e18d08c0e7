"""``digits``: scikit-learn's 8x8 handwritten digits, the built-in default that needs no download.

The 1797 images ship inside scikit-learn. A fixed 360-image test split (the
same in every run, independent of ``seed``) is set aside first, so test
accuracies from different seeds are comparable; the validation hold-out is
then drawn from the remaining 1437 with ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch

from bitsweep.data.types import DatasetSplits, ImageSet, make_splits

TEST_IMAGES = 360
DEFAULT_VAL_SIZE = 300
_TEST_SPLIT_SEED = 0  # fixed: the test split never moves


def load_digits_splits(val_size: int | None, seed: int) -> DatasetSplits:
    """Load the digits as 1-channel 8x8 uint8 images (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # (N, 64) values 0..16 -> (N, 1, 8, 8) values 0..255
    pixels = np.rint(bunch.data.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[perm[:TEST_IMAGES]] = True
    pool = ImageSet(images[~is_test], labels[~is_test])
    test = ImageSet(images[is_test], labels[is_test])
    names = tuple(str(i) for i in range(10))
    return make_splits("digits", pool, test, DEFAULT_VAL_SIZE if val_size is None else val_size, seed, names)
