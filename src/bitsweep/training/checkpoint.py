"""Training's view of checkpoints: run information, compatibility checks, and RNG state for exact resume.

The file format (plain dicts, ``weights_only`` loading, atomic writes) and the model
record live in :mod:`bitsweep.artifacts`; this module re-exports
:func:`save_checkpoint`/:func:`load_checkpoint` and adds what training needs on top:
the run's configuration, seed, epoch and metrics (:class:`CheckpointInfo`), and the
state of every random generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitsweep.artifacts import ModelRecord, load, load_checkpoint, record_of, save_checkpoint
from bitsweep.config import DataConfig, ModelConfig, RunConfig, from_dict
from bitsweep.errors import BitsweepError

__all__ = ["CheckpointInfo", "capture_rng", "check_compatible", "checkpoint_info", "load_checkpoint", "load_model",
           "restore_rng", "save_checkpoint"]  # fmt: skip


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about its run; the model part is its :class:`~bitsweep.artifacts.ModelRecord`."""

    record: ModelRecord
    config: RunConfig
    epoch: int
    metrics: dict[str, Any]

    @property
    def model(self) -> ModelConfig:
        """The run's model configuration (registry name, width, dropout)."""
        return self.config.model

    @property
    def data(self) -> DataConfig:
        """The run's dataset configuration."""
        return self.config.data

    @property
    def seed(self) -> int:
        """The run's seed (it also fixes the held-out validation split)."""
        return self.config.seed

    @property
    def num_classes(self) -> int:
        """Classifier outputs."""
        return self.record.num_classes

    @property
    def in_channels(self) -> int:
        """Image channels."""
        return self.record.in_channels

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of one image."""
        return self.record.image_size

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalization mean."""
        return self.record.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalization standard deviation."""
        return self.record.std


def checkpoint_info(state: dict[str, Any]) -> CheckpointInfo:
    """The :class:`CheckpointInfo` of a loaded float checkpoint dict.

    Raises:
        BitsweepError: the checkpoint has no run configuration (a bare model file).
    """
    if "config" not in state:
        raise BitsweepError("this checkpoint holds a model but no training run configuration; "
                            "load it with bitsweep.artifacts.load")  # fmt: skip
    return CheckpointInfo(record=record_of(state), config=from_dict(RunConfig, state["config"]),
                          epoch=int(state.get("epoch", 0)), metrics=dict(state.get("metrics", {})))  # fmt: skip


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


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    expect_model: str | None = None,
    expect_num_classes: int | None = None,
) -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild a float checkpoint's model with its weights (through :func:`bitsweep.artifacts.load`).

    Args:
        path: A checkpoint file, or a run directory (its best.pt).
        device: Where to put the model.
        expect_model: When given, the architecture the caller needs.
        expect_num_classes: When given, the class count the caller needs.

    Returns:
        The model in eval mode on ``device``, and the run information.

    Raises:
        BitsweepError: Unreadable or damaged checkpoint, a quantized one, or one of another
            architecture or class count.
    """
    loaded = load(path, device, expect="float")
    info = checkpoint_info(loaded.meta)
    check_compatible(info, path, model=expect_model, num_classes=expect_num_classes)
    return loaded.model, info


def capture_rng() -> dict[str, Any]:
    """The state of every random generator training touches (torch CPU/CUDA, NumPy, Python).

    Stored as tensors and plain values only, so it passes ``weights_only``
    loading.
    """
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)  # the legacy tuple: numpy's global generator is always MT19937
    kind, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
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
