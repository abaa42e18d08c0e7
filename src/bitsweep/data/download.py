"""Downloading, checksum verification and safe extraction of dataset files.

Every file is fetched to a temporary name beside its destination and only
renamed into place after its MD5 matches the published one, and archives are
extracted into a temporary folder that is renamed into place only when
extraction finished; an interrupted or corrupted download never leaves a file
that a later run would trust. URLs go through ``urllib``, so tests point the
same code at tiny archives with ``file://`` URLs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path

_CHUNK = 1 << 20


def default_data_dir() -> Path:
    """Where datasets are downloaded when ``data.data_dir`` is not set: ``$BITSWEEP_DATA`` or ``~/.cache/bitsweep``."""
    env = os.environ.get("BITSWEEP_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitsweep"


def md5_of(path: Path) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str, url: str) -> None:
    """Raise a BitsweepError naming the file and what to do when its MD5 is not ``md5``."""
    actual = md5_of(path)
    if actual != md5:
        raise BitsweepError(
            f"'{path}' is corrupted or incomplete (MD5 {actual}, expected {md5}); "
            f"delete it and download it again from {url}"
        )


def download_file(url: str, dest: Path, md5: str) -> Path:
    """Fetch ``url`` to ``dest`` atomically and verify its MD5; nothing is left at ``dest`` on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:  # noqa: S310
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", file=sys.stderr, leave=False
                ) as bar:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            actual = md5_of(tmp)
            if actual != md5:
                raise BitsweepError(
                    f"the download of {url} is corrupted (MD5 {actual}, expected {md5}); nothing was kept at "
                    f"'{dest}'; try again, or fetch the file by hand and put it there"
                )
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BitsweepError(f"could not download {url} to '{dest}': {e}") from None
    return dest


@dataclass(frozen=True)
class Archive:
    """One published dataset archive: what it is called, where it comes from, and what it unpacks to.

    Attributes:
        filename: Archive file name, e.g. ``cifar-10-python.tar.gz``.
        url: Download URL (``https://`` for the real ones, ``file://`` in tests).
        md5: Published MD5 of the archive.
        folder: The top-level folder the archive extracts to, e.g. ``cifar-10-batches-py``.
    """

    filename: str
    url: str
    md5: str
    folder: str

    def __post_init__(self) -> None:
        if len(self.md5) != 32:
            raise ValueError(f"md5 must be 32 hex digits, got {self.md5!r}")
        if Path(self.folder).name != self.folder or self.folder in ("", ".", ".."):
            raise ValueError(f"folder must be a plain folder name, got {self.folder!r}")


def extract_archive(archive_path: Path, folder: str, root: Path) -> Path:
    """Extract ``folder`` from the tar archive into ``root`` safely and atomically.

    Extraction uses tarfile's ``data`` filter (no absolute paths, no ``..``,
    no links leaving the tree, no device files) into a temporary folder; only
    a complete extraction is renamed to ``root/folder``.
    """
    target = root / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    try:
        try:
            with tarfile.open(archive_path, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BitsweepError(f"could not extract '{archive_path}': {e}; delete it and download it again") from None
        if not (tmp / folder).is_dir():
            raise BitsweepError(f"'{archive_path}' does not contain the folder '{folder}'; is it the right archive?")
        os.replace(tmp / folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_archive(archive: Archive, root: Path, download: bool) -> Path | None:
    """The extracted ``root/archive.folder``, extracting or downloading the archive first when needed.

    Returns None when neither the folder nor the archive is in ``root`` and
    ``download`` is off; the caller then explains where to put the files.
    """
    target = root / archive.folder
    if target.is_dir():
        return target
    path = root / archive.filename
    if path.is_file():
        verify_md5(path, archive.md5, archive.url)
    elif download:
        download_file(archive.url, path, archive.md5)
    else:
        return None
    return extract_archive(path, archive.folder, root)
