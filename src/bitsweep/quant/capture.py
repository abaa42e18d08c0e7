"""Reading one layer's inputs out of a prepared model, in float or quantized mode.

Post-training methods that fit a layer to its float behaviour (bias
correction, learned rounding) need, for each weight layer, the input it sees
in the float network and the input it sees in the quantized network. Both
come from the same prepared model: :func:`float_mode` turns every quantizer
off (the BN-folded float network), and :func:`layer_inputs` runs calibration
images up to one layer and stops there, so later layers cost nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear

WeightLayer = QuantConv2d | QuantLinear


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as the float (BN-folded) network: every quantizer off; restored afterwards."""
    acts = [(m, m.mode) for m in model.modules() if isinstance(m, ActivationQuantizer)]
    weights = [(m, m.weight_mode) for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    for m, _ in acts:
        m.mode = "off"
    for w, _ in weights:
        w.weight_mode = "off"
    try:
        yield
    finally:
        for m, mode in acts:
            m.mode = mode
        for w, wmode in weights:
            w.weight_mode = wmode


def execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, WeightLayer]]:
    """Quantized weight layers in the order one forward pass of ``example`` calls them."""
    names = {id(m): n for n, m in model.named_modules()}
    order: list[tuple[str, WeightLayer]] = []
    seen: set[int] = set()

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if id(m) not in seen:
            seen.add(id(m))
            order.append((names[id(m)], m))  # type: ignore[arg-type]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def module_inputs(model: nn.Module, module: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The first positional input ``module`` receives for each image, as the model is now set.

    Returns a tensor shaped like one batch of the module's input with N = ``images.shape[0]``,
    e.g. (N, C, H, W) for a convolution or a block, (N, F) for a linear layer.
    """
    chunks: list[torch.Tensor] = []

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        chunks.append(args[0].detach().clone())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for i in range(0, images.shape[0], batch_size):
            try:
                model(images[i : i + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(chunks)


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: WeightLayer, images: torch.Tensor) -> torch.Tensor:
    """What ``layer`` multiplies its weight with: its input after its own input quantizer, when it has one."""
    x = module_inputs(model, layer, images)
    q = layer.input_quantizer
    return q(x) if q is not None else x


def apply_weight(layer: WeightLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s float computation with another ``weight`` (bias included, no quantizers)."""
    if isinstance(layer, QuantConv2d):
        out: torch.Tensor = layer._conv_forward(x, weight, layer.bias)
        return out
    return F.linear(x, weight, layer.bias)
