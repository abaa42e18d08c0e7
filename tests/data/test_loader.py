"""TensorLoader: normalization, batching, determinism per (seed, epoch, rank), DDP sharding."""

from __future__ import annotations

import pytest
import torch

from bitsweep.config import AugmentConfig
from bitsweep.data import DatasetSplits, ImageSet, TensorLoader


def _collect(loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_normalized_batches_in_order(synthetic_splits: DatasetSplits) -> None:
    s = synthetic_splits
    loader = TensorLoader(s.test, 64, mean=s.mean, std=s.std)
    assert len(loader) == 4 and loader.num_samples == 200
    x, y = _collect(loader)
    assert x.dtype == torch.float32 and x.shape == (200, 3, 16, 16)
    assert torch.equal(y, s.test.labels)
    expected = (s.test.images.float() / 255 - torch.tensor(s.mean).view(1, 3, 1, 1)) / torch.tensor(s.std).view(
        1, 3, 1, 1
    )
    assert torch.allclose(x, expected, atol=1e-5)
    sizes = [xb.shape[0] for xb, _ in loader]
    assert sizes == [64, 64, 64, 8]


def test_drop_last_and_channels_last(synthetic_splits: DatasetSplits) -> None:
    s = synthetic_splits
    loader = TensorLoader(s.test, 64, mean=s.mean, std=s.std, drop_last=True, channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)


def test_shuffle_and_augment_depend_only_on_seed_and_epoch(synthetic_splits: DatasetSplits) -> None:
    s = synthetic_splits
    aug = AugmentConfig(crop_padding=2, hflip=True, autoaugment=True, cutout=4)

    def make(seed: int = 0) -> TensorLoader:
        return TensorLoader(s.train, 128, mean=s.mean, std=s.std, shuffle=True, augment=aug, seed=seed)

    a, b = make(), make()
    a.set_epoch(0)
    _collect(a)  # an uninterrupted run goes through epoch 0 first ...
    a.set_epoch(1)
    b.set_epoch(1)  # ... a resumed one starts at epoch 1
    xa, ya = _collect(a)
    xb, yb = _collect(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(2)
    assert not torch.equal(_collect(b)[1], ya)  # a new epoch reshuffles
    c = make(seed=1)
    c.set_epoch(1)
    assert not torch.equal(_collect(c)[1], ya)
    # shuffling permutes the whole split: every label count is kept
    assert torch.equal(torch.bincount(ya, minlength=10), torch.bincount(s.train.labels, minlength=10))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards(synthetic_splits: DatasetSplits, drop_last: bool) -> None:
    data = synthetic_splits.val.subset(slice(0, 99))  # 99 images over 4 ranks
    s = synthetic_splits
    loaders = [
        TensorLoader(data, 10, mean=s.mean, std=s.std, shuffle=True, seed=5, rank=r, world_size=4, drop_last=drop_last)
        for r in range(4)
    ]
    for loader in loaders:
        loader.set_epoch(3)
    assert len({len(loader) for loader in loaders}) == 1  # equal batch counts per rank
    assert {loader.num_samples for loader in loaders} == {24 if drop_last else 25}
    idx = torch.cat([loader.indices() for loader in loaders])
    if drop_last:
        assert len(set(idx.tolist())) == 96  # disjoint shards
    else:
        assert set(idx.tolist()) == set(range(99))  # every image seen; one wraps around to pad


def test_bad_arguments(digits_splits: DatasetSplits) -> None:
    s = digits_splits
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(s.train, 8, mean=s.mean, std=s.std, rank=2, world_size=2)
    with pytest.raises(ValueError, match="one per channel"):
        TensorLoader(s.train, 8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    tiny = ImageSet(s.train.images[:3], s.train.labels[:3])
    assert len(TensorLoader(tiny, 8, mean=s.mean, std=s.std, drop_last=True)) == 0
