"""Quantized checkpoints: a plain dict that ``torch.load(weights_only=True)`` reads.

Layout: ``format: "bitsweep-quantized"``, ``version``, ``quant_config`` (``to_dict(QuantConfig)``),
``quantizers`` (module name -> spec fields, plus ``kind`` and, for activations, ``site``), ``summary``,
``model_state`` (converted state: float weights, integer weights ``*.weight_quantizer.q``, every scale and
zero_point), ``model_record`` (the float network's :class:`~bitsweep.artifacts.record.ModelRecord`) and
``source`` (the float checkpoint's config, dataset, epoch and metrics), so the model can be rebuilt from the
file alone. Files written before ``model_record`` existed get the record derived from ``source``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsweep.artifacts.checkpoint import record_of
from bitsweep.artifacts.record import ModelRecord, check_finite, state_bound
from bitsweep.artifacts.restore import build_converted
from bitsweep.config import from_dict, to_dict
from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path
from bitsweep.quant.api import QuantSummary
from bitsweep.quant.config import QuantConfig
from bitsweep.quant.inspect import activation_quantizers, weight_layers

FORMAT, VERSION = "bitsweep-quantized", 1
SOURCE_KEYS = ("format", "version", "config", "dataset", "epoch", "metrics")


def quantized_state(
    model: nn.Module,
    config: QuantConfig,
    source: dict[str, Any],
    summary: QuantSummary,
    record: ModelRecord | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of a converted ``model`` quantized with ``config`` from the float checkpoint ``source``.

    Args:
        model: the converted model.
        config: its recipe.
        source: the float checkpoint dict (or the ``meta`` of :func:`bitsweep.artifacts.load`).
        summary: what ``quantize_`` did.
        record: the float network's record; None derives it from ``source``.
    """
    specs: dict[str, dict[str, Any]] = {}
    aq: Any
    m: Any
    for name, aq in activation_quantizers(model):
        specs[name] = {"kind": "activation", "site": getattr(aq, "site", ""), **dataclasses.asdict(aq.spec)}
    for name, m in weight_layers(model):
        specs[name] = {"kind": "weight", **dataclasses.asdict(m.weight_quantizer.spec)}
    record = record if record is not None else record_of(source)
    return {
        "format": FORMAT,
        "version": VERSION,
        "quant_config": to_dict(config),
        "quantizers": specs,
        "summary": summary.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_record": record.to_dict(),
        "source": {k: v for k, v in source.items() if k in SOURCE_KEYS},
    }


def save_quantized(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a :func:`quantized_state` dict atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def restore_quantized(state: dict[str, Any], where: str | Path) -> tuple[nn.Module, ModelRecord, QuantConfig]:
    """Rebuild the converted model of a quantized checkpoint dict (eval mode, CPU).

    Raises:
        BitsweepError: a wrong version, non-finite values, or a state that does not fit its record.
    """
    if state.get("version") != VERSION:
        raise BitsweepError(
            f"quantized checkpoint '{where}' has format version {state.get('version')}, this "
            f"bitsweep reads {VERSION}; run 'bitsweep quantize' again"
        )
    try:
        model_state, specs = state["model_state"], state["quantizers"]
        source = state.get("source", {})
        record = ModelRecord.from_dict(state["model_record"]) if "model_record" in state else record_of(source)
        config = from_dict(QuantConfig, state["quant_config"])
    except (KeyError, TypeError) as e:
        raise BitsweepError(f"quantized checkpoint '{where}' lacks {e}; run 'bitsweep quantize' again") from None
    if not isinstance(model_state, dict) or not isinstance(specs, dict):
        raise BitsweepError(f"quantized checkpoint '{where}' is damaged; run 'bitsweep quantize' again")
    check_finite(model_state)
    record.check_size(state_bound(model_state))
    try:
        model = build_converted(record, config, model_state, specs)
    except BitsweepError as e:
        raise BitsweepError(f"'{where}' does not fit the model it names ({e}); run 'bitsweep quantize' again") from None
    return model, record, config
