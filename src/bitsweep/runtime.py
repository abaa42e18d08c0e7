"""Devices, threads, autocast, seeding and run directories: the only place that looks at the hardware.

Library functions take a ``torch.device`` from their caller; the CLI gets it
from :func:`choose_device`. Nothing here keeps global state beyond what torch
itself keeps (the RNG seeds).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitsweep import __version__
from bitsweep.errors import BitsweepError


def choose_device(name: str = "auto") -> torch.device:
    """Resolve ``"auto"`` to the available accelerator (CUDA, MPS, ...) or the CPU.

    An explicit name that this machine lacks fails with a message instead of a
    deep CUDA error.
    """
    if name == "auto":
        accel = getattr(torch, "accelerator", None)
        if accel is not None and accel.is_available():
            current = accel.current_accelerator()
            if current is not None:
                return torch.device(current.type)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BitsweepError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BitsweepError(f"device '{name}' asked for, but this torch build sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BitsweepError(f"device '{name}' asked for, but MPS is not available here; use --device cpu")
    return device


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (where it speeds training up); a no-op elsewhere.

    On CPU, bf16 autocast is slower than fp32 for depthwise convolutions, so
    it is never turned on there.
    """
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of the source tree, or None outside a checkout."""
    here = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """A snapshot of what produced a result: versions, device, threads, git commit, host."""
    env: dict[str, Any] = {
        "bitsweep": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        env["device"] = str(device)
        if device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
    return env


def make_run_dir(output_dir: str | Path, name: str | None, prefix: str) -> Path:
    """Create a fresh run directory ``output_dir/name`` (default ``prefix-YYYYmmdd-HHMMSS``).

    An existing name gets a numeric suffix rather than mixing two runs' files.
    """
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / (name or f"{prefix}-{stamp}")
    path = base
    i = 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    path.mkdir(parents=True)
    return path


def compile_options() -> dict[str, Any] | None:
    """``torch.compile`` options every compiled path of bitsweep uses.

    torch 2.13's FX graph cache does not key on ``ATEN_CPU_CAPABILITY``: a cache filled with AVX-512
    kernels and then read with ``ATEN_CPU_CAPABILITY=avx2`` returned garbage logits (measured), so with
    that variable set, compile without the cache.
    """
    return {"fx_graph_cache": False} if os.environ.get("ATEN_CPU_CAPABILITY") else None


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def busy_cores() -> float:
    """Cores kept busy by other processes: the 1-minute load average (0 where there is none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int | None = None, *, cores: int | None = None, load: float | None = None) -> int:
    """Torch intra-op threads for this process: ``requested``, or the cores that are free now.

    Two threads on two cores with another process busy on one of them train 3-6x
    slower than one thread (issue 15: 15-31 against 95 img/s), because every
    parallel region waits for the thread that shares its core. So the default
    is the available cores minus the cores other processes keep busy (the
    1-minute load average, rounded), and at least 1. The load average counts
    the whole machine (in a container, other containers too), so on a shared
    host the default can be lower than the cores this process may use: pass
    ``--threads`` to choose.

    Args:
        requested: An explicit count (``--threads``); wins when given.
        cores: Available cores; default :func:`available_cores`.
        load: Busy cores; default :func:`busy_cores`.

    >>> choose_threads(cores=8, load=2.6)
    5
    >>> choose_threads(cores=2, load=7.0)
    1
    >>> choose_threads(3, cores=2, load=7.0)
    3
    """
    if requested is not None:
        if requested < 1:
            raise BitsweepError(f"--threads must be a positive whole number, got {requested}")
        return requested
    cores = available_cores() if cores is None else cores
    load = busy_cores() if load is None else load
    return max(1, cores - int(load + 0.5))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (used by parallel sweep workers)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
