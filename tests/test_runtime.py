"""Thread choice: explicit counts win, otherwise the free cores (available minus busy), at least one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bitsweep import runtime
from bitsweep.errors import BitsweepError
from bitsweep.runtime import available_cores, choose_threads


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.0, 2),  # quiet machine: every core
        (2, 0.4, 2),  # background noise rounds away
        (2, 1.0, 1),  # one core busy (issue 15's collapse case): one thread
        (2, 1.6, 1),
        (2, 7.0, 1),  # overloaded: never below one
        (16, 3.5, 12),  # 3.5 rounds to 4 busy cores
        (1, 0.0, 1),
    ],
)
def test_default_is_free_cores(cores: int, load: float, expected: int) -> None:
    assert choose_threads(cores=cores, load=load) == expected


def test_defaults_read_affinity_and_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 9.0, 9.0))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "max 100000\n")  # no cgroup CPU quota
    assert available_cores() == 6
    assert choose_threads() == 4  # 6 cores, 1-minute load 2.2 -> 2 busy


def test_cgroup_quota_caps_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "250000 100000\n")  # 2.5 CPUs
    assert available_cores() == 3


def test_no_load_average_means_no_busy_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert runtime.busy_cores() == 0.0
    assert choose_threads(cores=4) == 4


def test_explicit_count_wins_and_is_checked() -> None:
    assert choose_threads(3, cores=2, load=2.0) == 3
    with pytest.raises(BitsweepError, match="--threads must be a positive whole number, got 0"):
        choose_threads(0)
