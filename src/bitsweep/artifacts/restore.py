"""Rebuilding a model from any model file: the record builds it, one function restores every quantizer.

Quantized checkpoints and packed files both end here: they are turned into the
converted ``state_dict`` of the model plus the spec of every quantizer, and
:func:`restore_converted` puts both into a freshly prepared model, so the two
formats cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bitsweep.artifacts.record import ModelRecord
from bitsweep.errors import BitsweepError
from bitsweep.quant.api import quantize_
from bitsweep.quant.config import QuantConfig
from bitsweep.quant.inspect import activation_quantizers, weight_layers
from bitsweep.quant.methods import get_method
from bitsweep.quant.spec import QuantSpec


def spec_from_dict(d: Mapping[str, Any]) -> QuantSpec:
    """A :class:`QuantSpec` from its fields (extra keys such as ``kind``/``site`` are ignored).

    Raises:
        BitsweepError: a missing or invalid field.
    """
    try:
        return QuantSpec(**{f.name: d[f.name] for f in dataclasses.fields(QuantSpec) if f.name in d})
    except (KeyError, TypeError, ValueError) as e:
        raise BitsweepError(f"a stored quantizer spec is invalid ({e}); write the file again") from None


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` (strict) with a one-line message naming the entries that do not fit.

    Raises:
        BitsweepError: entries missing, unexpected, or of another shape.
    """
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    problems = [
        f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if problems:
        raise BitsweepError("; ".join(problems))
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as e:
        raise BitsweepError(" ".join(str(e).split())[:300]) from None


def build_float(record: ModelRecord, state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """The float model of ``record`` with ``state`` loaded, in eval mode.

    Raises:
        BitsweepError: the state does not fit the model the record builds.
    """
    model = record.build()
    try:
        load_state(model, state)
    except BitsweepError as e:
        raise BitsweepError(f"checkpoint '{where}' does not match its own {record.label} config ({e})") from None
    return model.eval()


@torch.no_grad()
def build_converted(
    record: ModelRecord,
    config: QuantConfig,
    state: Mapping[str, torch.Tensor],
    specs: Mapping[str, Mapping[str, Any]],
) -> nn.Module:
    """The converted quantized model: ``record.build()``, ``quantize_(config)``, then :func:`restore_converted`.

    The method's data-free structural change (``PTQMethod.restructure``: equalized pairs use ReLU)
    is replayed on the built model first, so the architecture matches the one that was quantized.

    Raises:
        BitsweepError: the state or specs do not fit the rebuilt model.
    """
    model = record.build().eval()
    restructure = get_method(config.method).restructure
    if restructure is not None:
        restructure(model)
    quantize_(model, config)
    restore_converted(model, state, specs)
    return model.eval()


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a buffer (or parameter) so that it takes ``value``'s shape before ``load_state_dict``."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.clone())


@torch.no_grad()
def restore_converted(
    model: nn.Module, state: Mapping[str, torch.Tensor], specs: Mapping[str, Mapping[str, Any]]
) -> None:
    """Load a converted state into a model prepared with the same config, and re-freeze every quantizer.

    Args:
        model: the float model after ``quantize_`` with the stored config.
        state: its complete converted ``state_dict`` (integers ``*.weight_quantizer.q``, every scale and
            zero point); every key must have a place in the model and every place a key.
        specs: quantizer module name -> spec fields, for every weight layer and activation quantizer.

    Raises:
        BitsweepError: missing or extra quantizers or state entries, or shapes that do not fit.
    """
    layers: dict[str, Any] = dict(weight_layers(model))
    aqs: dict[str, Any] = dict(activation_quantizers(model))
    missing = sorted((set(layers) | set(aqs)) - set(specs))
    extra = sorted(set(specs) - set(layers) - set(aqs))
    if missing or extra:
        raise BitsweepError(
            f"stored quantizers do not fit the rebuilt model (missing {missing[:3]}, unknown {extra[:3]})"
        )
    try:
        for name, m in layers.items():
            wq, prefix = m.weight_quantizer, f"{name}." if name else ""
            wq.spec = spec_from_dict(specs[name])
            for attr in ("q", "scale", "zero_point"):
                _put(wq, attr, state[f"{prefix}weight_quantizer.{attr}"])
    except KeyError as e:
        raise BitsweepError(f"the stored state lacks {e}") from None
    load_state(model, state)
    for name, aq in aqs.items():
        aq.set_qparams(spec_from_dict(specs[name]), aq.scale, aq.zero_point)
    for name, m in layers.items():
        if m.weight_quantizer.q.shape != m.weight.shape:
            raise BitsweepError(
                f"layer '{name}' has {list(m.weight_quantizer.q.shape)} integers for a {list(m.weight.shape)} weight"
            )
        m.refresh()
    for m in model.modules():  # same inference shortcut convert() enables (exact, see QuantOutput.try_fuse)
        fuse = getattr(m, "try_fuse", None)
        if callable(fuse):
            fuse()
