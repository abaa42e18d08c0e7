"""One restore path for every model file: ``load(path) -> Loaded``.

A float checkpoint (``bitsweep train``), a quantized checkpoint (``bitsweep quantize``)
and a packed file (``bitsweep export``) are told apart by their bytes, rebuilt
through their :class:`~bitsweep.artifacts.record.ModelRecord` (so pruned and
user-defined models come back at their stored shapes), checked for NaN/inf values
once, and restored through :func:`bitsweep.artifacts.restore.restore_converted`
when quantized. Every command and library caller loads models through here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsweep.artifacts.checkpoint import FORMAT as FLOAT_FORMAT
from bitsweep.artifacts.checkpoint import check_float, read_torch_file, record_of, resolve
from bitsweep.artifacts.packed_read import load_packed
from bitsweep.artifacts.quantized import FORMAT as QUANTIZED_FORMAT
from bitsweep.artifacts.quantized import restore_quantized
from bitsweep.artifacts.record import ModelRecord, state_bound
from bitsweep.artifacts.restore import build_float
from bitsweep.config import DataConfig, from_dict
from bitsweep.errors import BitsweepError
from bitsweep.quant.config import QuantConfig

KINDS = ("float", "quantized", "packed")
_HEAVY = ("model_state", "optimizer", "scheduler", "rng")


@dataclass(frozen=True)
class Loaded:
    """A model rebuilt from a file, with what the file says about it.

    Attributes:
        model: the model in eval mode on the requested device (converted, for quantized kinds).
        record: how the float network is built.
        kind: ``"float"``, ``"quantized"`` or ``"packed"``.
        quant_config: the recipe of a quantized model; None for a float one.
        meta: the run description: a float checkpoint's entries without its tensors (``config``,
            ``dataset``, ``epoch``, ``metrics``), a quantized checkpoint's ``source`` (plus ``summary``), or
            a packed file's ``extra``.
        path: the file read (a run directory resolves to its checkpoint).
    """

    model: nn.Module
    record: ModelRecord
    kind: str
    quant_config: QuantConfig | None
    meta: dict[str, Any]
    path: Path

    @property
    def data(self) -> DataConfig | None:
        """The dataset the model was trained on, when the file says (None for a bare model file)."""
        raw = self.meta.get("config", {}).get("data") if isinstance(self.meta.get("config"), dict) else None
        raw = raw if raw is not None else self.meta.get("data")
        if not isinstance(raw, dict):
            return None
        try:
            return from_dict(DataConfig, raw)
        except BitsweepError:
            return None

    @property
    def seed(self) -> int:
        """The run's seed (it fixes the held-out validation split); 0 when unknown."""
        config = self.meta.get("config")
        seed = config.get("seed") if isinstance(config, dict) else self.meta.get("seed")
        return int(seed) if isinstance(seed, int) else 0

    def source_meta(self) -> dict[str, Any]:
        """The JSON-ready ``extra`` of a packed file written from this model: source, metrics, data, seed."""
        data = self.data
        return {
            "source_checkpoint": str(self.path),
            "metrics": self.meta.get("metrics", {}),
            "data": dataclasses.asdict(data) if data is not None else None,
            "seed": self.seed,
        }


def file_kind(path: str | Path) -> str:
    """``"packed"`` for a safetensors file (8-byte header length, then JSON), else ``"checkpoint"``.

    Raises:
        BitsweepError: the path does not exist.
    """
    p = resolve(path)
    if not p.is_file():
        raise BitsweepError(f"model file '{path}' not found; pass a checkpoint, a run directory or a packed file")
    with open(p, "rb") as f:
        head = f.read(9)
    return "packed" if head[8:9] == b"{" else "checkpoint"


def load(path: str | Path, device: torch.device | str = "cpu", *, expect: str | None = None) -> Loaded:
    """Rebuild the model of any bitsweep model file, in eval mode on ``device``.

    Args:
        path: a float or quantized checkpoint, a run directory (its last.pt, else best.pt) or a packed file.
        device: where to put the model.
        expect: when given (``"float"``, ``"quantized"`` or ``"packed"``), refuse other kinds before building.

    Raises:
        BitsweepError: one line for a missing, damaged, foreign or unexpected file, NaN/inf weights, or a
            state that does not fit the model its record builds.
    """
    p = resolve(path)
    if file_kind(p) == "packed":
        _expect(expect, "packed", p)
        model, meta = load_packed(p)
        return Loaded(model.to(device).eval(), meta.record, "packed", meta.config, dict(meta.extra), p)
    state = read_torch_file(p)
    fmt = state.get("format")
    if fmt == QUANTIZED_FORMAT:
        _expect(expect, "quantized", p)
        model, record, config = restore_quantized(state, p)
        source = {**state.get("source", {}), "summary": state.get("summary", {})}
        return Loaded(model.to(device).eval(), record, "quantized", config, source, p)
    if fmt != FLOAT_FORMAT:
        raise BitsweepError(f"'{p}' is a '{fmt}' file, not a bitsweep model file")
    if isinstance(state.get("qat"), dict):  # a QAT run's training state: float weights plus learned scales
        raise BitsweepError(
            f"'{p}' is the training state of a QAT run; its quantized model is '{p.parent / 'quantized.pt'}' "
            f"(an interrupted run continues with 'bitsweep qat --resume {p.parent}')"
        )
    _expect(expect, "float", p)
    check_float(state, p)  # complete, and no NaN/inf weights
    record = record_of(state)
    weights = state["model_state"]
    record.check_size(state_bound(weights))
    model = build_float(record, weights, str(p))
    run = {k: v for k, v in state.items() if k not in _HEAVY}
    return Loaded(model.to(device).eval(), record, "float", None, run, p)


def _expect(expect: str | None, kind: str, p: Path) -> None:
    if expect is None or expect == kind:
        return
    hints = {
        "float": "pass the float checkpoint it was made from (best.pt / last.pt)",
        "quantized": "run 'bitsweep quantize' on it first",
        "packed": "export it with 'bitsweep export'",
    }
    raise BitsweepError(f"'{p}' is a {kind} model file, but a {expect} one is needed here; {hints[expect]}")
