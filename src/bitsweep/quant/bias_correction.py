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

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def _biases(layers: list[WeightLayer], values: list[torch.Tensor | None]) -> Iterator[None]:
    """Temporarily give ``layers`` the biases ``values`` (the float network's, before any correction)."""
    current = [layer.bias.detach().clone() if layer.bias is not None else None for layer in layers]
    for layer, v in zip(layers, values, strict=True):
        if layer.bias is not None and v is not None:
            layer.bias.copy_(v)
    try:
        yield
    finally:
        for layer, v in zip(layers, current, strict=True):
            if layer.bias is not None and v is not None:
                layer.bias.copy_(v)


@torch.no_grad()
def correct_bias(model: nn.Module, images: torch.Tensor, progress: bool = False) -> list[BiasShift]:
    """Correct the bias of every quantized weight layer of a converted ``model`` in place.

    The float side of each measurement runs with the original biases (the float network), the quantized
    side with the biases corrected so far.

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
    original = [layer.bias.detach().clone() if layer.bias is not None else None for layer in layers]
    shifts: list[BiasShift] = []
    bar = tqdm(list(zip(order, original, strict=True)), desc="bias correction", unit="layer", disable=not progress)
    for (name, layer), bias in bar:
        with float_mode(model), _biases(layers, original):
            x_float = layer_inputs(model, layer, images)
            y_float = _channel_mean(apply_weight(layer, x_float, layer.weight))
        x_quant = layer_inputs(model, layer, images)
        weight_q = layer.weight_fq if layer.weight_fq is not None else layer.weight
        shift = y_float - _channel_mean(apply_weight(layer, x_quant, weight_q))
        assert layer.bias is not None and bias is not None
        layer.bias.add_(shift.to(layer.bias.dtype))
        shifts.append(BiasShift(name, float(shift.abs().mean())))
        bar.set_postfix_str(f"{name} mean |shift| {shifts[-1].mean_abs_shift:.3g}")
    return shifts
