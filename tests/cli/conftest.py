"""Fixtures of the CLI tests: one thread, and a tiny untrained checkpoint on the synthetic data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bitsweep.runtime import torch_threads


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids waiting on a busy second core."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, write_untrained_checkpoint) -> Path:
    """An untrained width-0.25 MobileNet-v2 on the synthetic data (3x16x16; 500/100/200 images)."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt"))
