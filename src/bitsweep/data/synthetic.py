"""``synthetic``: a tiny, learnable image set for fast tests of the other packages.

Each class is a fixed smooth colour pattern; images are that pattern plus
pixel noise and a random brightness offset. A small network separates the
classes in a few epochs, so tests of training and quantization can check that
accuracy moves without any file on disk. The images are the same in every
run (fixed content seed); only the validation hold-out follows ``seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitsweep.data.types import DatasetSplits, ImageSet, make_splits

NUM_CLASSES = 10
CHANNELS = 3
SIZE = 16
TRAIN_IMAGES = 600  # including the validation hold-out
TEST_IMAGES = 200
DEFAULT_VAL_SIZE = 100
_CONTENT_SEED = 20240601  # fixed: the images never change between runs


def _images(labels: torch.Tensor, prototypes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = labels.shape[0]
    base = prototypes[labels]  # (N, C, H, W) float in 0..255
    noise = torch.randn(n, CHANNELS, SIZE, SIZE, generator=gen) * 28.0
    offset = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 40.0
    return (base + noise + offset).round().clamp(0, 255).to(torch.uint8)


def synthetic_sets() -> tuple[ImageSet, ImageSet]:
    """The fixed (train pool, test) pair of the synthetic dataset."""
    gen = torch.Generator().manual_seed(_CONTENT_SEED)
    # (K, C, 4, 4) random coarse patterns -> (K, C, 16, 16) smooth prototypes in 40..215
    coarse = torch.rand(NUM_CLASSES, CHANNELS, 4, 4, generator=gen)
    prototypes = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 175.0 + 40.0
    sets = []
    for n in (TRAIN_IMAGES, TEST_IMAGES):
        labels = torch.arange(n, dtype=torch.int64) % NUM_CLASSES
        labels = labels[torch.randperm(n, generator=gen)]
        sets.append(ImageSet(_images(labels, prototypes, gen), labels))
    return sets[0], sets[1]


def load_synthetic(val_size: int | None, seed: int) -> DatasetSplits:
    """Build the synthetic dataset: 10 classes of 3x16x16 images, 500/100/200 by default."""
    pool, test = synthetic_sets()
    names = tuple(f"pattern{i}" for i in range(NUM_CLASSES))
    return make_splits("synthetic", pool, test, DEFAULT_VAL_SIZE if val_size is None else val_size, seed, names)
