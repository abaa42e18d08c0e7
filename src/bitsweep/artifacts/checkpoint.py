"""Float checkpoints: plain dicts written atomically and read safely, and the record of their model.

A checkpoint is a dict of tensors and plain Python values, loaded with
``torch.load(weights_only=True)``: a downloaded or shared file can never run
code, and nothing here falls back to plain pickle::

    {"format": "bitsweep-checkpoint", "version": 1, "config": to_dict(RunConfig),
     "dataset": {"name", "num_classes", "in_channels", "image_size", "mean", "std"},
     "model_state": state_dict, "epoch": int, "metrics": {...},
     "model_record": ModelRecord.to_dict()  (optional: pruned or user-defined models),
     "optimizer", "scheduler", "rng": only in last.pt (for resuming)}

A checkpoint without ``model_record`` (every checkpoint ``bitsweep train`` wrote so
far) describes a registry model at its factory shapes: the record is derived from
``config.model`` and ``dataset``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bitsweep.artifacts.record import ModelRecord, check_finite
from bitsweep.config import ModelConfig, from_dict
from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path

FORMAT = "bitsweep-checkpoint"
VERSION = 1


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's best.pt (chosen on validation; last.pt when there is none).

    Every command that reads a model from a run directory (eval, quantize, sweep, export) gets the same file;
    resuming training reads last.pt explicitly.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
    return p


def read_torch_file(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Any bitsweep ``.pt`` file as a dict, read with ``weights_only=True``.

    Raises:
        BitsweepError: missing, unreadable, corrupt, pickled objects, or no bitsweep format marker.
    """
    p = resolve(path)
    if not p.is_file():
        raise BitsweepError(f"checkpoint '{path}' not found; pass a run directory or its best.pt / last.pt")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the unpickler
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitsweepError(
            f"cannot read checkpoint '{p}' ({first[:160]}); the file is corrupt or was not written by bitsweep"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), str):
        raise BitsweepError(f"'{p}' is not a bitsweep checkpoint (no format marker); train one with 'bitsweep train'")
    return state


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (complete or absent, never half-written)."""
    full = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(full, tmp)


def load_checkpoint(path: str | Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a float checkpoint safely, refusing damaged weights (NaN/inf) once here for every caller.

    Raises:
        BitsweepError: The file is missing, unreadable or corrupt, is not a float bitsweep checkpoint,
            is incomplete, or holds non-finite weights.
    """
    p = resolve(path)
    return check_float(read_torch_file(p, map_location), p)


def check_float(state: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """``state`` when it is a complete float checkpoint with finite weights (see :func:`load_checkpoint`)."""
    if state.get("format") != FORMAT:
        raise BitsweepError(
            f"'{where}' is not a bitsweep checkpoint (no format marker); train one with 'bitsweep train'"
        )
    if state.get("version") != VERSION:
        raise BitsweepError(
            f"checkpoint '{where}' has format version {state.get('version')}, this bitsweep reads version {VERSION}"
        )
    needed = ("model_state",) if "model_record" in state else ("config", "dataset", "model_state")
    for key in needed:
        if key not in state:
            raise BitsweepError(f"checkpoint '{where}' lacks its '{key}' entry; it is incomplete")
    if not isinstance(state["model_state"], dict):
        raise BitsweepError(f"checkpoint '{where}' has no weights dict; it is damaged")
    check_finite(state["model_state"])
    return state


def record_of(state: dict[str, Any]) -> ModelRecord:
    """The :class:`ModelRecord` of a float checkpoint dict (or a quantized checkpoint's ``source``).

    Uses the stored ``model_record``; older files get one derived from ``config.model`` and ``dataset``.

    Raises:
        BitsweepError: neither a record nor a model/dataset description is present.
    """
    if "model_record" in state:
        return ModelRecord.from_dict(state["model_record"])
    try:
        model = from_dict(ModelConfig, state["config"]["model"])
        ds = state["dataset"]
        return ModelRecord(
            name=model.name,
            num_classes=int(ds["num_classes"]),
            in_channels=int(ds["in_channels"]),
            image_size=(int(ds["image_size"][0]), int(ds["image_size"][1])),
            mean=tuple(float(v) for v in ds["mean"]),
            std=tuple(float(v) for v in ds["std"]),
            options={"width": model.width, "dropout": model.dropout},
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BitsweepError(f"checkpoint lacks its model/dataset description ({e}); write it again") from None
