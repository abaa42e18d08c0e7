"""``fashion_mnist``: Zalando's Fashion-MNIST from its IDX files, kept at the native 28x28.

Files are looked for (raw or ``.gz``) in ``data_dir`` and ``data_dir/fashion-mnist``,
then in Debian's ``/usr/share/datasets/fashion-mnist`` (package
dataset-fashion-mnist), and otherwise downloaded from the official mirror into
``data_dir/fashion-mnist`` with the published MD5s checked.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from bitsweep.data.download import default_data_dir, download_file
from bitsweep.data.types import DatasetSplits, ImageSet, make_splits
from bitsweep.errors import BitsweepError

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FOLDER = "fashion-mnist"
DEFAULT_VAL_SIZE = 5000
FILES = {  # stem -> published MD5 of the .gz file
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83fd310",
}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IDX_DTYPES: dict[int, type[np.generic] | str] = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"
}  # fmt: skip


def parse_idx(data: bytes, what: str = "IDX data", expect_ndim: int | None = None) -> np.ndarray:
    """Parse the bytes of an IDX file (magic, big-endian dims, payload) into an array.

    The magic number is checked first and in full (``expect_ndim``: 3 for
    images, 1 for labels), so a wrong file is called wrong, not truncated.

    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
    [7, 8, 9]
    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]), "labels.idx", expect_ndim=3)
    Traceback (most recent call last):
    ...
    bitsweep.errors.BitsweepError: labels.idx has magic number 00000801 (1-d), expected 00000803 (3-d); replace it
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise BitsweepError(f"{what} is not an IDX file (bad magic number {data[:4].hex()}); replace it")
    if expect_ndim is not None and data[3] != expect_ndim:
        want = bytes([0, 0, data[2], expect_ndim]).hex()
        raise BitsweepError(
            f"{what} has magic number {data[:4].hex()} ({data[3]}-d), expected {want} ({expect_ndim}-d); replace it"
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BitsweepError(f"{what} is truncated (incomplete header); replace it with a complete copy")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise BitsweepError(
            f"{what} is truncated or padded: dims {dims} need {expected} bytes of data, found {len(data) - header}; "
            "replace it with a complete copy"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read a raw or gzipped IDX file, with a clear error for damaged files (see :func:`parse_idx`)."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BitsweepError(f"'{path}' is damaged or truncated ({e}); delete it and fetch it again") from None
    return parse_idx(data, f"'{path}'", expect_ndim)


def _find(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def locate_files(data_dir: str | None, download: bool) -> dict[str, Path]:
    """Find (or download) the four IDX files; one error listing what to put where when that fails."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    dirs = [root, root / FOLDER, SYSTEM_DIR]
    found = {stem: _find(stem, dirs) for stem in FILES}
    missing = [stem for stem, p in found.items() if p is None]
    if missing and download:
        try:
            for stem in missing:
                found[stem] = download_file(URL + stem + ".gz", root / FOLDER / (stem + ".gz"), FILES[stem])
            missing = []
        except BitsweepError as e:
            reason = f" (download failed: {e})"
        else:
            reason = ""
    else:
        reason = "" if not missing else " (data.download=false)"
    if missing:
        names = ", ".join(s + ".gz" for s in missing)
        raise BitsweepError(
            f"Fashion-MNIST files not found{reason}: put {names} from {URL} into '{root / FOLDER}' "
            "(or set data.data_dir to the folder holding them)"
        )
    return {stem: p for stem, p in found.items() if p is not None}


def load_fashion_mnist(data_dir: str | None, download: bool, val_size: int | None, seed: int) -> DatasetSplits:
    """Load Fashion-MNIST as 1x28x28 uint8 images: 55000/5000/10000 by default."""
    files = locate_files(data_dir, download)
    sets = []
    for prefix in ("train", "t10k"):
        images = read_idx(files[f"{prefix}-images-idx3-ubyte"], expect_ndim=3)
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"], expect_ndim=1)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.dtype != np.uint8:
            raise BitsweepError(
                f"Fashion-MNIST {prefix} files do not match: images {images.shape}, labels {labels.shape}; "
                "replace them with the official files"
            )
        # (N, H, W) -> (N, 1, H, W)
        sets.append(ImageSet(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64))))
    val = DEFAULT_VAL_SIZE if val_size is None else val_size
    return make_splits("fashion_mnist", sets[0], sets[1], val, seed, CLASS_NAMES)
