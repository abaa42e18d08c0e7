"""``cifar10`` / ``cifar100``: the official archives, in the python (pickle) or the binary format.

Lookup order in ``data_dir`` (default ``$BITSWEEP_DATA`` or ``~/.cache/bitsweep``):
an extracted python folder, an extracted binary folder, a python archive to
verify and extract, and finally a download of the python archive. The python
batches are pickles, and unpickling runs code named in the file, so they are
read only through :class:`RestrictedUnpickler`, which can build numpy arrays
and nothing else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitsweep.data.download import Archive, default_data_dir, fetch_archive
from bitsweep.data.types import DatasetSplits, ImageSet, make_splits
from bitsweep.errors import BitsweepError

DEFAULT_VAL_SIZE = 5000
_BASE = "https://www.cs.toronto.edu/~kriz/"


def _archive(name: str, md5: str, folder: str) -> Archive:
    return Archive(name, _BASE + name, md5, folder)


# The official archives and their published MD5 sums.
PYTHON_ARCHIVES = {
    10: _archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    100: _archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}
BINARY_ARCHIVES = {
    10: _archive("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
    100: _archive("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary"),
}
_PIXELS = 3 * 32 * 32


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays (all the CIFAR batches contain) and refuses anything else.

    Plain ``pickle.load`` would import and call whatever a file names (e.g.
    ``os.system``), so a tampered download could run code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' (only numpy arrays are allowed)")
        if name == "_reconstruct":
            # numpy 2 moved numpy.core to numpy._core; old files name the old path
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
            return _reconstruct
        return np.ndarray if name == "ndarray" else np.dtype


def load_pickle(path: Path) -> dict[str, Any]:
    """Read one python-format CIFAR batch through the restricted unpickler; keys become ``str``."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except FileNotFoundError:
        raise BitsweepError(f"'{path}' is missing; re-extract the official CIFAR archive") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise BitsweepError(f"'{path}' is not a valid CIFAR batch ({e}); replace it with the official file") from None
    if not isinstance(obj, dict):
        raise BitsweepError(f"'{path}' is not a valid CIFAR batch (expected a dict); replace it with the official file")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _as_str(x: Any) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def _whole_numbers(value: Any, path: Path, what: str, low: int, high: int | None) -> np.ndarray:
    """``value`` as an int64 array, or a user error when it holds anything but whole numbers in range.

    >>> _whole_numbers(["7", "x"], Path("data_batch_1"), "data", 0, 255)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bitsweep.errors.BitsweepError: 'data_batch_1' has data that are not whole numbers (dtype <U1); replace ...
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # ragged nested lists
        arr = np.asarray([None])
    if arr.dtype.kind not in "iub":
        raise BitsweepError(
            f"'{path}' has {what} that are not whole numbers (dtype {arr.dtype}); replace it with the official file"
        )
    arr = arr.astype(np.int64)
    if arr.size and (int(arr.min()) < low or (high is not None and int(arr.max()) > high)):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise BitsweepError(f"'{path}' has {what} outside {span}; replace it with the official file")
    return arr


def _python_split(folder: Path, files: list[str], label_key: str) -> ImageSet:
    images, labels = [], []
    for name in files:
        batch = load_pickle(folder / name)
        if "data" not in batch or label_key not in batch:
            raise BitsweepError(f"'{folder / name}' lacks the 'data' or '{label_key}' entry; replace it")
        data = _whole_numbers(batch["data"], folder / name, "data", 0, 255).astype(np.uint8)
        lab = _whole_numbers(batch[label_key], folder / name, f"'{label_key}'", 0, None)
        if data.ndim != 2 or data.shape[1] != _PIXELS or lab.ndim != 1 or data.shape[0] != lab.shape[0]:
            raise BitsweepError(f"'{folder / name}' has data of shape {data.shape}; expected (N, 3072)")
        images.append(data)
        labels.append(lab)
    # (N, 3072) rows are R plane, G plane, B plane -> (N, 3, 32, 32)
    x = np.concatenate(images).reshape(-1, 3, 32, 32)
    return ImageSet(torch.from_numpy(x), torch.from_numpy(np.concatenate(labels)))


def read_python(folder: Path, num_classes: int) -> tuple[ImageSet, ImageSet, tuple[str, ...]]:
    """Train pool, test set and class names from an extracted python-format folder."""
    if num_classes == 10:
        train = _python_split(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels")
        test = _python_split(folder, ["test_batch"], "labels")
        names = load_pickle(folder / "batches.meta").get("label_names", [])
    else:
        train = _python_split(folder, ["train"], "fine_labels")
        test = _python_split(folder, ["test"], "fine_labels")
        names = load_pickle(folder / "meta").get("fine_label_names", [])
    return train, test, tuple(_as_str(n) for n in names)


def _binary_split(folder: Path, files: list[str], num_classes: int) -> ImageSet:
    label_bytes = 1 if num_classes == 10 else 2  # CIFAR-100 records: coarse label, fine label
    record = label_bytes + _PIXELS
    chunks = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise BitsweepError(f"'{path}' is missing; re-extract the official CIFAR binary archive")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise BitsweepError(
                f"'{path}' has {raw.size} bytes, not a whole number of {record}-byte records; replace it"
            )
        chunks.append(raw.reshape(-1, record))
    rows = np.concatenate(chunks)
    labels = rows[:, label_bytes - 1].astype(np.int64)  # the fine label is the last label byte
    x = np.ascontiguousarray(rows[:, label_bytes:]).reshape(-1, 3, 32, 32)
    return ImageSet(torch.from_numpy(x), torch.from_numpy(labels))


def read_binary(folder: Path, num_classes: int) -> tuple[ImageSet, ImageSet, tuple[str, ...]]:
    """Train pool, test set and class names from an extracted binary-format folder."""
    if num_classes == 10:
        train = _binary_split(folder, [f"data_batch_{i}.bin" for i in range(1, 6)], 10)
        test = _binary_split(folder, ["test_batch.bin"], 10)
        names_file = folder / "batches.meta.txt"
    else:
        train = _binary_split(folder, ["train.bin"], 100)
        test = _binary_split(folder, ["test.bin"], 100)
        names_file = folder / "fine_label_names.txt"
    names = names_file.read_text(encoding="latin1").split() if names_file.is_file() else []
    return train, test, tuple(names)


def find_cifar(
    num_classes: int,
    root: Path,
    download: bool,
    python_archive: Archive | None = None,
    binary_archive: Archive | None = None,
) -> tuple[Path, str]:
    """Locate (extracting or downloading if needed) a CIFAR folder; returns (folder, "python" | "binary").

    The archive arguments default to the official ones; tests pass tiny
    archives with ``file://`` URLs to exercise the same code.
    """
    py = python_archive or PYTHON_ARCHIVES[num_classes]
    binary = binary_archive or BINARY_ARCHIVES[num_classes]
    for archive, fmt in ((py, "python"), (binary, "binary")):
        if (root / archive.folder).is_dir():
            return root / archive.folder, fmt
    if (root / binary.filename).is_file() and not (root / py.filename).is_file():
        folder = fetch_archive(binary, root, download=False)
        assert folder is not None  # the archive is present, so it is extracted or an error was raised
        return folder, "binary"
    reason = "data.download=false"
    if (root / py.filename).is_file() or download:
        try:
            folder = fetch_archive(py, root, download)
        except BitsweepError as e:
            if (root / py.filename).is_file():
                raise  # a corrupted archive the user put there: say so, do not hide it
            reason = f"download failed: {e}"
        else:
            if folder is not None:
                return folder, "python"
    raise BitsweepError(
        f"CIFAR-{num_classes} not found in '{root}' ({reason}): put the extracted folder '{py.folder}' "
        f"(or '{binary.folder}'), or the archive '{py.filename}' from {py.url}, into '{root}', "
        "or set data.data_dir to the folder that holds it"
    )


def load_cifar(
    num_classes: int,
    data_dir: str | None,
    download: bool,
    val_size: int | None,
    seed: int,
    python_archive: Archive | None = None,
    binary_archive: Archive | None = None,
) -> DatasetSplits:
    """Load CIFAR-10 or CIFAR-100 (fine labels) as 3x32x32 uint8 images: 45000/5000/10000 by default."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    folder, fmt = find_cifar(num_classes, root, download, python_archive, binary_archive)
    reader = read_python if fmt == "python" else read_binary
    train, test, names = reader(folder, num_classes)
    if len(names) != num_classes:
        names = tuple(str(i) for i in range(num_classes))  # metadata file absent or odd: fall back to numbers
    for what, split in (("training", train), ("test", test)):
        if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= num_classes):
            raise BitsweepError(f"CIFAR-{num_classes} {what} labels in '{folder}' fall outside 0..{num_classes - 1}")
    name = f"cifar{num_classes}"
    return make_splits(name, train, test, DEFAULT_VAL_SIZE if val_size is None else val_size, seed, names)
