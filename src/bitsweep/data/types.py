"""The values the data package hands to everyone else: one split (:class:`ImageSet`) and a whole dataset.

Images stay uint8 in memory (a quarter of the float32 size) and are only
converted and normalized batch by batch on the device, so every dataset here
fits in host and accelerator memory at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitsweep.errors import BitsweepError


@dataclass(frozen=True)
class ImageSet:
    """One split, resident in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        """The images and labels at ``index`` (e.g. a calibration subset)."""
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset split three ways: train, validation (held out of train), and test (final reporting only).

    ``mean``/``std`` are per channel on the 0..1 scale, measured on ``train``
    alone so nothing about the held-out images leaks into preprocessing.
    """

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def meta(self) -> dict[str, Any]:
        """The plain-dict description checkpoints store, enough to rebuild the model and its input pipeline."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per channel")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images on the 0..1 scale.

    Computed from exact integer histograms, so the result does not depend on
    summation order (or on the machine).

    >>> m, s = channel_stats(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    >>> m, s
    ((0.5,), (0.5,))
    """
    n, c = images.shape[0], images.shape[1]
    if n == 0:
        return (0.0,) * c, (1.0,) * c
    # (N, C, H, W) -> (C, N*H*W) so each row is one channel's pixels
    flat = images.transpose(0, 1).reshape(c, -1).numpy()
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for ch in range(c):
        hist = np.bincount(flat[ch], minlength=256).astype(np.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var**0.5, 1e-6))  # a constant channel would otherwise divide by zero
    return tuple(means), tuple(stds)


def hold_out(data: ImageSet, val_size: int, seed: int, what: str) -> tuple[ImageSet, ImageSet]:
    """Split ``data`` into (train, val) with ``val_size`` images drawn by a permutation seeded with ``seed``.

    Both parts keep the original order of their images, so the split is the
    only thing ``seed`` changes.
    """
    n = len(data)
    if val_size >= n:
        raise BitsweepError(
            f"data.val_size={val_size} leaves no training images in {what} ({n} available); use a value below {n}"
        )
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    perm = torch.randperm(n, generator=gen)
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[perm[:val_size]] = True
    return data.subset(~is_val), data.subset(is_val)


def make_splits(
    name: str,
    train_pool: ImageSet,
    test: ImageSet,
    val_size: int,
    seed: int,
    class_names: tuple[str, ...],
) -> DatasetSplits:
    """Hold ``val_size`` images out of ``train_pool`` and measure normalization statistics on the rest."""
    train, val = hold_out(train_pool, val_size, seed, name)
    mean, std = channel_stats(train.images)
    _, c, h, w = train.images.shape
    return DatasetSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        in_channels=int(c),
        image_size=(int(h), int(w)),
        mean=mean,
        std=std,
        class_names=class_names,
    )
