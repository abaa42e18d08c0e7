"""Empirical bias correction: give back the mean shift that quantization adds to each output channel.

Rounding errors of a row of weights do not average out to zero over real
inputs: they shift each output channel's mean (Nagel et al., 2019; Banner et
al., 2019). Measured on calibration images, the shift
``E[float layer(float input)] - E[quantized layer(quantized input)]`` is added
to the layer's bias, one layer after another in execution order, so each
correction sees the already-corrected network. Biases stay floating point
until the lowering turns them into int32, so nothing else changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from bitsweep.quant.capture import WeightLayer, apply_weight, execution_order, float_mode, layer_inputs


@dataclass(frozen=True)
class BiasShift:
    """The correction applied to one layer: mean absolute shift before and after."""

    name: str
    mean_abs_shift: float


def _channel_mean(y: torch.Tensor) -> torch.Tensor:
    """Mean per output channel of (N, C, H, W) or (N, C)."""
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(dim=1)  # (C,)


@torch.no_grad()
def _float_means(
    model: nn.Module, layers: list[WeightLayer], images: torch.Tensor, batch: int = 256
) -> list[torch.Tensor]:
    """Per-channel output means of every layer in the float network, from one pass over ``images``."""
    sums: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)

    def hook(i: int, m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        y = out.transpose(0, 1).reshape(out.shape[1], -1)  # (C, N*H*W)
        sums[i] = y.sum(dim=1) if sums[i] is None else sums[i] + y.sum(dim=1)  # type: ignore[operator]
        counts[i] += y.shape[1]

    handles = [layer.register_forward_hook(functools.partial(hook, i)) for i, layer in enumerate(layers)]
    try:
        with float_mode(model):  # every quantizer off: what each layer computes in the float network
            for k in range(0, images.shape[0], batch):
                model(images[k : k + batch])
    finally:
        for h in handles:
            h.remove()
    return [s / c for s, c in zip(sums, counts, strict=True) if s is not None]


@torch.no_grad()
def correct_bias(model: nn.Module, images: torch.Tensor, progress: bool = False) -> list[BiasShift]:
    """Correct the bias of every quantized weight layer of a converted ``model`` in place.

    The float side is measured once, before any correction (the float network does not change); the
    quantized side layer by layer, with the biases corrected so far.

    Args:
        model: a model after ``convert``.
        images: calibration images (N, C, H, W) on the model's device.
        progress: a progress bar per layer with its shift and ETA.

    Returns:
        The shift removed from each layer, in execution order.
    """
    model.eval()
    order = execution_order(model, images[:1])
    layers = [layer for _, layer in order]
    for layer in layers:
        if layer.bias is None:  # give every layer a bias to correct (zero: the same network)
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    float_means = _float_means(model, layers, images)
    shifts: list[BiasShift] = []
    bar = tqdm(list(zip(order, float_means, strict=True)), desc="bias correction", unit="layer", disable=not progress)
    for (name, layer), y_float in bar:
        x_quant = layer_inputs(model, layer, images)
        weight_q = layer.weight_fq if layer.weight_fq is not None else layer.weight
        shift = y_float - _channel_mean(apply_weight(layer, x_quant, weight_q))
        assert layer.bias is not None
        layer.bias.add_(shift.to(layer.bias.dtype))
        shifts.append(BiasShift(name, float(shift.abs().mean())))
        bar.set_postfix_str(f"{name} mean |shift| {shifts[-1].mean_abs_shift:.3g}")
    return shifts
