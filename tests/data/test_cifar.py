"""CIFAR loading through the real code paths, on tiny archives built in both official formats."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bitsweep.config import DataConfig
from bitsweep.data import Archive, load_dataset
from bitsweep.data.cifar import RestrictedUnpickler, load_cifar, load_pickle
from bitsweep.errors import BitsweepError

TRAIN_PER_BATCH = 4
TEST_IMAGES = 6


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _labels(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n).astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    # protocol 4: py3 bytes need protocol >= 3 to avoid `_codecs.encode`, which the real (py2) files never use
    path.write_bytes(pickle.dumps(obj, protocol=4))


def make_cifar10(root: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write a tiny CIFAR-10 folder; returns (train images, train labels, test images, test labels)."""
    folder = root / ("cifar-10-batches-py" if fmt == "python" else "cifar-10-batches-bin")
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    xs, ys = [], []
    for b in range(1, 7):
        n = TRAIN_PER_BATCH if b <= 5 else TEST_IMAGES
        x, y = _images(n, b), _labels(n, 10, 100 + b)
        name = f"data_batch_{b}" if b <= 5 else "test_batch"
        if fmt == "python":
            _dump(folder / name, {"batch_label": name, "labels": y.tolist(), "data": x.reshape(n, 3072),
                                  "filenames": [f"{i}.png" for i in range(n)]})  # fmt: skip
        else:
            rows = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(n, 3072)], axis=1)
            rows.tofile(folder / f"{name}.bin")
        xs.append(x)
        ys.append(y)
    if fmt == "python":
        _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": TRAIN_PER_BATCH})
    else:
        (folder / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def make_cifar100(root: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write a tiny CIFAR-100 folder with coarse labels that differ from the fine ones."""
    folder = root / ("cifar-100-python" if fmt == "python" else "cifar-100-binary")
    folder.mkdir(parents=True)
    out = []
    for split, n, seed in (("train", 12, 1), ("test", TEST_IMAGES, 2)):
        x, fine = _images(n, seed), _labels(n, 100, 10 + seed)
        coarse = (fine + 7) % 20
        if fmt == "python":
            _dump(folder / split, {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                                   "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(),
                                   "data": x.reshape(n, 3072)})  # fmt: skip
        else:
            labels = np.stack([coarse, fine], 1).astype(np.uint8)
            np.concatenate([labels, x.reshape(n, 3072)], axis=1).tofile(folder / f"{split}.bin")
        out += [x, fine]
    fine_names = [f"fine{i}" for i in range(100)]
    if fmt == "python":
        _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    else:
        (folder / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
    return out[0], out[1], out[2], out[3]


MAKERS = {10: make_cifar10, 100: make_cifar100}
FOLDERS = {(10, "python"): "cifar-10-batches-py", (10, "binary"): "cifar-10-batches-bin",
           (100, "python"): "cifar-100-python", (100, "binary"): "cifar-100-binary"}  # fmt: skip


def make_archive(src_root: Path, folder: str, dest: Path) -> Archive:
    """tar.gz ``src_root/folder`` to ``dest`` and describe it with a file:// URL and its real MD5."""
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src_root / folder, arcname=folder)
    md5 = hashlib.md5(dest.read_bytes()).hexdigest()
    return Archive(dest.name, dest.resolve().as_uri(), md5, folder)


def _check(splits, num_classes: int, expected: tuple) -> None:
    x_train, y_train, x_test, y_test = expected
    assert splits.name == f"cifar{num_classes}"
    assert splits.num_classes == num_classes and splits.in_channels == 3 and splits.image_size == (32, 32)
    assert np.array_equal(splits.train.images.numpy(), x_train)
    assert np.array_equal(splits.train.labels.numpy(), y_train)
    assert np.array_equal(splits.test.images.numpy(), x_test)
    assert np.array_equal(splits.test.labels.numpy(), y_test)
    prefix = "class" if num_classes == 10 else "fine"
    assert splits.class_names[3] == f"{prefix}3"
    assert len(splits.val) == 0
    assert abs(splits.mean[0] - x_train[:, 0].mean() / 255) < 1e-9


@pytest.mark.parametrize("fmt", ["python", "binary"])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_extracted_folder_loads_exactly(tmp_path: Path, num_classes: int, fmt: str) -> None:
    expected = MAKERS[num_classes](tmp_path, fmt)
    cfg = DataConfig(name=f"cifar{num_classes}", data_dir=str(tmp_path), download=False, val_size=0)
    _check(load_dataset(cfg), num_classes, expected)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_download_via_file_url_verifies_and_extracts(tmp_path: Path, num_classes: int) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    src.mkdir()
    expected = MAKERS[num_classes](src, "python")
    archive = make_archive(src, FOLDERS[(num_classes, "python")], tmp_path / f"tiny-{num_classes}.tar.gz")
    splits = load_cifar(num_classes, str(root), True, 0, 0, python_archive=archive)
    _check(splits, num_classes, expected)
    assert (root / archive.filename).is_file() and (root / archive.folder).is_dir()
    assert sorted(p.name for p in root.iterdir()) == sorted([archive.filename, archive.folder])  # no temp leftovers
    # second call uses the extracted folder, even with the network off
    _check(load_cifar(num_classes, str(root), False, 0, 0, python_archive=archive), num_classes, expected)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_binary_archive_in_data_dir_is_extracted(tmp_path: Path, num_classes: int) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    src.mkdir()
    root.mkdir()
    expected = MAKERS[num_classes](src, "binary")
    archive = make_archive(src, FOLDERS[(num_classes, "binary")], root / f"tiny-bin-{num_classes}.tar.gz")
    splits = load_cifar(num_classes, str(root), False, 0, 0, binary_archive=archive)
    _check(splits, num_classes, expected)


def test_corrupted_archive_fails_checksum_and_extracts_nothing(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    src.mkdir()
    root.mkdir()
    make_cifar10(src, "python")
    archive = make_archive(src, "cifar-10-batches-py", root / "tiny.tar.gz")
    data = bytearray((root / "tiny.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "tiny.tar.gz").write_bytes(bytes(data))
    with pytest.raises(BitsweepError, match=r"corrupted or incomplete.*delete it and download it again"):
        load_cifar(10, str(root), True, 0, 0, python_archive=archive)
    assert [p.name for p in root.iterdir()] == ["tiny.tar.gz"]


def test_corrupted_download_keeps_nothing(tmp_path: Path) -> None:
    src, root = tmp_path / "src", tmp_path / "root"
    src.mkdir()
    make_cifar10(src, "python")
    good = make_archive(src, "cifar-10-batches-py", tmp_path / "tiny.tar.gz")
    bad = Archive(good.filename, good.url, "0" * 32, good.folder)
    with pytest.raises(BitsweepError, match="corrupted") as info:
        load_cifar(10, str(root), True, 0, 0, python_archive=bad)
    assert "cifar-10-batches-py" in str(info.value)  # the one message still says what to put where
    assert not root.exists() or list(root.iterdir()) == []


def test_missing_offline_gives_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(BitsweepError) as info:
        load_dataset(DataConfig(name="cifar100", data_dir=str(tmp_path), download=False))
    msg = str(info.value)
    assert "cifar-100-python" in msg and "cifar-100-binary" in msg and "cifar-100-python.tar.gz" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg and str(tmp_path) in msg
    assert "\n" not in msg


def test_unreachable_download_is_folded_into_the_message(tmp_path: Path) -> None:
    archive = Archive("x.tar.gz", (tmp_path / "nowhere.tar.gz").as_uri(), "0" * 32, "cifar-10-batches-py")
    with pytest.raises(BitsweepError, match=r"download failed.*put the extracted folder 'cifar-10-batches-py'"):
        load_cifar(10, str(tmp_path / "root"), True, None, 0, python_archive=archive)


def test_path_traversal_in_archive_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    path = root / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        payload = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    archive = Archive("evil.tar.gz", path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest(), "cifar-10-batches-py")
    with pytest.raises(BitsweepError, match="could not extract"):
        load_cifar(10, str(root), False, 0, 0, python_archive=archive)
    assert not (tmp_path / "escaped.txt").exists()
    assert [p.name for p in root.iterdir()] == ["evil.tar.gz"]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"data": _Exploit(marker)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(blob)).load()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(blob)
    with pytest.raises(BitsweepError, match="not a valid CIFAR batch"):
        load_pickle(folder / "data_batch_1")
    with pytest.raises(BitsweepError, match="data_batch_1"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False))
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy_arrays() -> None:
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps({b"data": x}, protocol=4)), encoding="latin1").load()
    assert np.array_equal(loaded[b"data"], x) and loaded[b"data"].dtype == np.uint8


def test_truncated_binary_batch_is_reported(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "binary")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BitsweepError, match="data_batch_3.bin.*3073-byte records"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False))


def test_python_folder_preferred_and_val_split(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "python")
    shutil.copytree(tmp_path / "cifar-10-batches-py", tmp_path / "cifar-10-batches-bin")  # would fail as binary
    splits = load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False, val_size=5), seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, TEST_IMAGES)


@pytest.mark.parametrize(("key", "value"), [("data", [["a"] * 3072] * 4), ("labels", ["cat"] * 4)])
def test_batch_entries_that_are_not_numbers(tmp_path: Path, key: str, value: object) -> None:
    make_cifar10(tmp_path, "python")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch = pickle.loads(path.read_bytes())
    batch[key] = value
    _dump(path, batch)
    with pytest.raises(BitsweepError, match=f"data_batch_3' has {key if key == 'data' else repr(key)} that are not"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path), download=False))
