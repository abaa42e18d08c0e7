"""Quantized checkpoints: a plain dict that ``torch.load(weights_only=True)`` reads, and its loader.

Layout: ``format: "bitsweep-quantized"``, ``version``, ``quant_config`` (``to_dict(QuantConfig)``),
``quantizers`` (module name -> spec fields, plus ``kind`` and, for activations, ``site``), ``summary``,
``model_state`` (converted state: float weights, integer weights ``*.weight_quantizer.q``, every scale and
zero_point) and ``source`` (the float checkpoint's config, dataset, epoch and metrics), so the model can be
rebuilt from the file alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsweep.config import from_dict, to_dict
from bitsweep.errors import BitsweepError
from bitsweep.io import atomic_path
from bitsweep.quant.api import QuantSummary, quantize_
from bitsweep.quant.config import QuantConfig
from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear, QuantOutput
from bitsweep.quant.spec import QuantSpec

FORMAT, VERSION = "bitsweep-quantized", 1
SOURCE_KEYS = ("format", "version", "config", "dataset", "epoch", "metrics")


def quantized_state(
    model: nn.Module, config: QuantConfig, source: dict[str, Any], summary: QuantSummary
) -> dict[str, Any]:
    """The checkpoint dict of a converted ``model`` quantized with ``config`` from the float checkpoint ``source``."""
    specs: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            specs[name] = {"kind": "activation", "site": m.site, **dataclasses.asdict(m.spec)}
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            specs[name] = {"kind": "weight", **dataclasses.asdict(m.weight_quantizer.spec)}
    return {
        "format": FORMAT,
        "version": VERSION,
        "quant_config": to_dict(config),
        "quantizers": specs,
        "summary": summary.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "source": {k: v for k, v in source.items() if k in SOURCE_KEYS},
    }


def save_quantized(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a :func:`quantized_state` dict atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a converted model from a quantized checkpoint; returns (model in eval mode, the checkpoint dict).

    Raises:
        BitsweepError: for a missing, unreadable or non-quantized checkpoint.
    """
    from bitsweep.training.checkpoint import build_model, checkpoint_info

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BitsweepError(f"quantized checkpoint '{path}' not found") from None
    except Exception as e:  # noqa: BLE001 - corrupt or foreign file
        raise BitsweepError(f"'{path}' is not a readable checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BitsweepError(f"'{path}' is not a quantized checkpoint; make one with 'bitsweep quantize'")
    config = from_dict(QuantConfig, state["quant_config"])
    model = build_model(checkpoint_info(state["source"])).eval()
    quantize_(model, config)
    restore_converted(model, state["model_state"], state["quantizers"])
    return model.to(device), state


def restore_converted(model: nn.Module, model_state: dict[str, torch.Tensor], specs: dict[str, dict[str, Any]]) -> None:
    """Load a converted state into a model prepared with the same config, and re-freeze every quantizer."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, (QuantConv2d, QuantLinear)):
            wq = m.weight_quantizer
            wq.spec = _spec(specs[name])
            wq.q = model_state[prefix + "weight_quantizer.q"].clone()
            wq.scale = model_state[prefix + "weight_quantizer.scale"].clone()
            wq.zero_point = model_state[prefix + "weight_quantizer.zero_point"].clone()
    model.load_state_dict(model_state)
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            m.set_qparams(_spec(specs[name]), m.scale, m.zero_point)
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            m.refresh()
    for m in model.modules():
        if isinstance(m, QuantOutput):
            m.try_fuse()


def _spec(d: dict[str, Any]) -> QuantSpec:
    return QuantSpec(**{f.name: d[f.name] for f in dataclasses.fields(QuantSpec)})
