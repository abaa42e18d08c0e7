"""How measurement recognises quantized layers: by the attributes of the quant contract, not by class.

``bitsweep.quant`` promises that quantized weight layers carry a
``weight_quantizer`` (with ``spec``, ``scale``, ``zero_point``, ``int_weight()``)
and activation quantizers carry ``spec``, ``scale`` and ``zero_point``.
Reading only these attributes keeps measurement independent of the quant
package's class names; the type guards name the classes that implement the
contract, so type checkers know the attributes' types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:  # for the type guards only: modules imports graph, which imports this module
    from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear


def is_weight_layer(module: nn.Module) -> TypeGuard[QuantConv2d | QuantLinear]:
    """True for a quantized Conv/Linear: it has a ``weight_quantizer`` with a spec."""
    wq = getattr(module, "weight_quantizer", None)
    return wq is not None and hasattr(wq, "spec")


def is_activation_quantizer(module: nn.Module) -> TypeGuard[ActivationQuantizer]:
    """True for an activation quantizer module: it has ``spec``, ``scale`` and ``zero_point`` but no weight."""
    return (
        all(hasattr(module, a) for a in ("spec", "scale", "zero_point"))
        and not hasattr(module, "weight_quantizer")
        and not hasattr(module, "int_weight")  # a weight quantizer has qparams too
        and not isinstance(getattr(module, "weight", None), nn.Parameter)
    )


def weight_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """(qualified name, module) of every quantized weight layer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]


def activation_quantizers(model: nn.Module) -> list[tuple[str, ActivationQuantizer]]:
    """(qualified name, module) of every activation quantizer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if n and is_activation_quantizer(m)]


def other_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State entries kept as stored: everything but quantized layers' weights/biases and quantizer buffers.

    Weights and biases of quantized layers are excluded (they are accounted per layer).
    Non-persistent buffers are not part of the state and are not counted.
    """
    skip_prefixes = [f"{n}." for n, _ in weight_layers(model)]
    aq_prefixes = [f"{n}." for n, _ in activation_quantizers(model)]
    out = {}
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in aq_prefixes):
            continue
        owner = next((p for p in skip_prefixes if key.startswith(p)), None)
        if owner is not None:
            rest = key[len(owner) :]
            if rest in ("weight", "bias") or "_quantizer" in rest:
                continue
        out[key] = t
    return out
