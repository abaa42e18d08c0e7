"""Dataset loading: shapes, split sizes and determinism, IDX parsing, Fashion-MNIST lookup and download."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bitsweep.config import DataConfig
from bitsweep.data import DatasetSplits, ImageSet, channel_stats, list_datasets, load_dataset
from bitsweep.data import fashion_mnist as fm
from bitsweep.data.fashion_mnist import parse_idx, read_idx
from bitsweep.errors import BitsweepError


def _check_splits(s: DatasetSplits, sizes: tuple[int, int, int], shape: tuple[int, int, int]) -> None:
    assert (len(s.train), len(s.val), len(s.test)) == sizes
    for part in (s.train, s.val, s.test):
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert tuple(part.images.shape[1:]) == shape
        assert int(part.labels.min()) >= 0 and int(part.labels.max()) < s.num_classes
    assert s.in_channels == shape[0] and s.image_size == shape[1:]
    assert len(s.class_names) == s.num_classes == 10
    mean, std = channel_stats(s.train.images)
    assert s.mean == mean and s.std == std
    ref = s.train.images.double() / 255
    assert torch.allclose(torch.tensor(s.mean, dtype=torch.float64), ref.mean((0, 2, 3)), atol=1e-9)
    assert torch.allclose(torch.tensor(s.std, dtype=torch.float64), ref.std((0, 2, 3), correction=0), atol=1e-9)


def test_list_datasets() -> None:
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "synthetic"]


def test_synthetic(synthetic_splits: DatasetSplits) -> None:
    _check_splits(synthetic_splits, (500, 100, 200), (3, 16, 16))
    assert torch.bincount(synthetic_splits.test.labels, minlength=10).tolist() == [20] * 10


def test_synthetic_classes_are_separable(synthetic_splits: DatasetSplits) -> None:
    # nearest class mean on raw pixels must beat chance by far, or nothing could learn it quickly
    tr, te = synthetic_splits.train, synthetic_splits.test
    x = tr.images.flatten(1).float()
    means = torch.stack([x[tr.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(te.images.flatten(1).float(), means).argmin(1)
    assert (pred == te.labels).float().mean() > 0.8


def test_digits(digits_splits: DatasetSplits) -> None:
    _check_splits(digits_splits, (1137, 300, 360), (1, 8, 8))
    assert int(digits_splits.train.images.max()) == 255  # 16 scaled to 255


def test_split_determinism_and_seed_dependence() -> None:
    a = load_dataset(DataConfig(name="digits"), seed=1)
    b = load_dataset(DataConfig(name="digits"), seed=1)
    c = load_dataset(DataConfig(name="digits"), seed=2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split never depends on the seed
    # train and val partition the same pool whatever the seed
    pool_a = torch.cat([a.train.images, a.val.images]).flatten(1)
    pool_c = torch.cat([c.train.images, c.val.images]).flatten(1)
    assert sorted(map(bytes, pool_a.numpy())) == sorted(map(bytes, pool_c.numpy()))


def test_val_size_option_and_errors() -> None:
    s = load_dataset(DataConfig(name="synthetic", val_size=50))
    assert (len(s.train), len(s.val)) == (550, 50)
    with pytest.raises(BitsweepError, match="val_size=600 leaves no training images"):
        load_dataset(DataConfig(name="synthetic", val_size=600))
    with pytest.raises(BitsweepError, match=r"unknown dataset 'fashion_mnst' \(did you mean 'fashion_mnist'\?\)"):
        load_dataset(DataConfig(name="fashion_mnst"))


def test_imageset_validates() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_roundtrip_and_errors(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx(x)), x)
    with pytest.raises(BitsweepError, match="truncated"):
        parse_idx(_idx(x)[:-1])
    with pytest.raises(BitsweepError, match="truncated"):
        parse_idx(_idx(x)[:9])
    with pytest.raises(BitsweepError, match="bad magic"):
        parse_idx(b"\x1f\x8b\x08\x00rest")
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(_idx(x)))
    assert np.array_equal(read_idx(gz), x)
    gz.write_bytes(gzip.compress(_idx(x))[:-12])  # truncated gzip stream
    with pytest.raises(BitsweepError, match="damaged or truncated"):
        read_idx(gz)


def _write_tiny_fashion(folder: Path, compress: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 30),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (8, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = _idx(arr)
        if compress:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_from_data_dir(tmp_path: Path, compress: bool) -> None:
    arrays = _write_tiny_fashion(tmp_path, compress)
    s = load_dataset(DataConfig(name="fashion_mnist", data_dir=str(tmp_path), download=False, val_size=5))
    assert (len(s.train), len(s.val), len(s.test)) == (25, 5, 8)
    assert np.array_equal(s.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(s.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert s.class_names[9] == "Ankle boot"


def test_fashion_download_via_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror, root = tmp_path / "mirror", tmp_path / "root"
    arrays = _write_tiny_fashion(mirror, compress=True)
    md5s = {stem: hashlib.md5((mirror / (stem + ".gz")).read_bytes()).hexdigest() for stem in arrays}
    monkeypatch.setattr(fm, "URL", mirror.as_uri() + "/")
    monkeypatch.setattr(fm, "FILES", md5s)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    s = load_dataset(DataConfig(name="fashion_mnist", data_dir=str(root), val_size=0))
    assert np.array_equal(s.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert sorted(p.name for p in (root / "fashion-mnist").iterdir()) == sorted(s + ".gz" for s in arrays)
    # a corrupted mirror: the checksum fails, nothing is kept, and the one message says what to put where
    bad = {stem: "0" * 32 for stem in arrays}
    monkeypatch.setattr(fm, "FILES", bad)
    root2 = tmp_path / "root2"
    with pytest.raises(BitsweepError, match=r"download failed.*corrupted.*put train-images-idx3-ubyte.gz"):
        load_dataset(DataConfig(name="fashion_mnist", data_dir=str(root2)))
    assert not (root2 / "fashion-mnist").exists() or list((root2 / "fashion-mnist").iterdir()) == []


def test_fashion_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(BitsweepError, match=r"data.download=false.*t10k-labels-idx1-ubyte.gz.*fashion-mnist"):
        load_dataset(DataConfig(name="fashion_mnist", data_dir=str(tmp_path), download=False))


@pytest.mark.skipif(not fm.SYSTEM_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    s = load_dataset(DataConfig(name="fashion_mnist", data_dir=str(tmp_path), download=False))
    _check_splits(s, (55000, 5000, 10000), (1, 28, 28))
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    assert abs(s.mean[0] - 0.286) < 0.002 and abs(s.std[0] - 0.353) < 0.002


def test_wrong_idx_magic_is_named_not_called_truncated(tmp_path: Path) -> None:
    arrays = _write_tiny_fashion(tmp_path, compress=False)
    labels = arrays["train-labels-idx1-ubyte"]
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(labels))  # a labels file where images belong
    with pytest.raises(BitsweepError, match=r"has magic number 00000801 \(1-d\), expected 00000803 \(3-d\)"):
        load_dataset(DataConfig(name="fashion_mnist", data_dir=str(tmp_path), download=False))
