"""Plain-dict checkpoints: saving atomically, loading safely, rebuilding the model.

A checkpoint is a dict of tensors and plain Python values, loaded with
``torch.load(weights_only=True)``: a downloaded or shared file can never run
code, and nothing here falls back to plain pickle. The dict carries the
resolved run configuration and the dataset's shape and normalization, so a
checkpoint alone is enough to rebuild and evaluate its model::

    {"format": "bitsweep-checkpoint", "version": 1, "config": to_dict(RunConfig),
     "dataset": {"name", "num_classes", "in_channels", "image_size", "mean", "std"},
     "model_state": state_dict, "epoch": int, "metrics": {...},
     "optimizer", "scheduler", "rng": only in last.pt (for resuming)}
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitsweep.config import DataConfig, ModelConfig, RunConfig, from_dict
from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path
from bitsweep.models import create_model

FORMAT = "bitsweep-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about its model, its data and its run."""

    model: ModelConfig
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    data: DataConfig
    seed: int
    epoch: int
    metrics: dict[str, Any]
    config: RunConfig


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (complete or absent, never half-written)."""
    full = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(full, tmp)


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a bitsweep checkpoint safely.

    Raises:
        BitsweepError: The file is missing, unreadable or corrupt, or is not a bitsweep checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt" if (p / "last.pt").is_file() else p / "best.pt"
    if not p.is_file():
        raise BitsweepError(f"checkpoint '{path}' not found; pass a run directory or its best.pt / last.pt")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the unpickler
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitsweepError(
            f"cannot read checkpoint '{p}' ({first[:160]}); the file is corrupt or was not written by bitsweep"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BitsweepError(f"'{p}' is not a bitsweep checkpoint (no format marker); train one with 'bitsweep train'")
    if state.get("version") != VERSION:
        raise BitsweepError(
            f"checkpoint '{p}' has format version {state.get('version')}, this bitsweep reads version {VERSION}"
        )
    for key in ("config", "dataset", "model_state"):
        if key not in state:
            raise BitsweepError(f"checkpoint '{p}' lacks its '{key}' entry; it is incomplete")
    return state


def checkpoint_info(state: dict[str, Any]) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a loaded checkpoint dict."""
    config = from_dict(RunConfig, state["config"])
    ds = state["dataset"]
    return CheckpointInfo(
        model=config.model,
        num_classes=int(ds["num_classes"]),
        in_channels=int(ds["in_channels"]),
        image_size=(int(ds["image_size"][0]), int(ds["image_size"][1])),
        mean=tuple(float(v) for v in ds["mean"]),
        std=tuple(float(v) for v in ds["std"]),
        data=config.data,
        seed=config.seed,
        epoch=int(state.get("epoch", 0)),
        metrics=dict(state.get("metrics", {})),
        config=config,
    )


def check_compatible(
    info: CheckpointInfo,
    where: str | Path,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
) -> None:
    """Raise one clear error when a checkpoint holds another architecture or class count than expected."""
    want = []
    have = []
    if model is not None and model != info.model.name:
        want.append(f"model {model}")
        have.append(f"model {info.model.name}")
    if num_classes is not None and num_classes != info.num_classes:
        want.append(f"{num_classes} classes")
        have.append(f"{info.num_classes} classes")
    if in_channels is not None and in_channels != info.in_channels:
        want.append(f"{in_channels} input channels")
        have.append(f"{info.in_channels} input channels")
    if want:
        raise BitsweepError(
            f"checkpoint '{where}' holds {', '.join(have)} (trained on {info.data.name}), "
            f"but {', '.join(want)} was expected; pass a matching checkpoint or drop the conflicting option"
        )


def build_model(info: CheckpointInfo) -> nn.Module:
    """A freshly initialized model of the checkpoint's architecture and size."""
    return create_model(
        info.model.name,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        width=info.model.width,
        dropout=info.model.dropout,
    )


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    expect_model: str | None = None,
    expect_num_classes: int | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild a checkpoint's model with its weights, in eval mode, on ``device``.

    Args:
        path: A checkpoint file, or a run directory (its last.pt).
        device: Where to put the model.
        expect_model: When given, the architecture the caller needs.
        expect_num_classes: When given, the class count the caller needs.

    Raises:
        BitsweepError: Unreadable checkpoint, or one of another architecture or class count.
    """
    state = load_checkpoint(path)
    info = checkpoint_info(state)
    check_compatible(info, path, model=expect_model, num_classes=expect_num_classes)
    model = build_model(info)
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise BitsweepError(f"checkpoint '{path}' does not match its own {info.model.name} config: {first}") from None
    return model.to(device).eval(), info


def capture_rng() -> dict[str, Any]:
    """The state of every random generator training touches (torch CPU/CUDA, NumPy, Python).

    Stored as tensors and plain values only, so it passes ``weights_only``
    loading.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every random generator back to a state from :func:`capture_rng`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
