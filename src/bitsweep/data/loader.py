"""A tensor-resident data loader: the whole split lives on the device as one uint8 tensor.

Small image datasets fit in device memory many times over, so batches are
cut by indexing instead of by worker processes and collation, and
augmentation runs as batched tensor ops. All randomness of an epoch comes
from one generator seeded from (seed, epoch, rank) only, which is what makes
resumed training repeat an uninterrupted run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from bitsweep.config import AugmentConfig
from bitsweep.data.augment import augment_batch
from bitsweep.data.types import ImageSet


def epoch_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (well-separated streams for neighbouring epochs and ranks).

    >>> epoch_seed(0, 1, 0) != epoch_seed(0, 0, 1)
    True
    """
    state = np.random.SeedSequence([int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TensorLoader:
    """Iterate (x, y) batches: x float32 normalized (B, C, H, W), y int64 (B,), both on ``device``.

    Args:
        data: The split to iterate; copied to ``device`` once.
        batch_size: Images per batch.
        mean: Per-channel mean on the 0..1 scale (from ``DatasetSplits.mean``).
        std: Per-channel standard deviation on the 0..1 scale.
        shuffle: Draw a new order every epoch.
        augment: Training-time augmentation; None for evaluation.
        drop_last: Drop the last incomplete batch.
        device: Where the images live and batches are produced.
        seed: Base seed for shuffling and augmentation.
        channels_last: Yield x in channels-last memory format.
        rank: This process's index for data-parallel training.
        world_size: Number of data-parallel processes; each rank gets an equal share
            (padded by wrapping around, or truncated with ``drop_last``), so all ranks
            run the same number of batches.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: AugmentConfig | None = None,
        drop_last: bool = False,
        device: torch.device | str = torch.device("cpu"),
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        c = data.images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        # x = (u8 / 255 - mean) / std  ==  u8 * scale + shift
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        n = len(data)
        if drop_last:
            self.num_samples = n // world_size
        else:
            self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """The image indices this rank visits this epoch, in order (on the CPU)."""
        n = len(self.labels)
        if self.shuffle:
            # same permutation on every rank (seeded without rank) so the shards partition it
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by wrapping around so every rank gets num_samples
            order = order.repeat(math.ceil(total / n))
        order = order[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank, 1))
        idx = self.indices().to(self.device)
        for i in range(len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[sel]
            if self.augment is not None:
                images = augment_batch(images, self.augment, gen)
            x = images.float().mul_(self._scale).add_(self._shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[sel]
