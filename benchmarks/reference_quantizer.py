"""The assignment's reference quantizer: the baseline every bitsweep number is compared with.

Written from its description, deliberately without improvements:

* weights: per-tensor, symmetric, min-max scale (``max|w| / qmax``), applied to
  every ``nn.Conv2d`` and ``nn.Linear`` *as they are*, i.e. without folding
  BatchNorm into the convolution first (so the scale is chosen for the raw
  conv weight, and BN later multiplies the rounding error by ``gamma/sigma``);
* activations: an unsigned min-max quantizer inserted after every ``nn.ReLU``
  module and nowhere else.

MobileNet-v2 uses ``nn.ReLU6``, so on it this quantizer inserts *no*
activation quantizer at all: its "W8A8" is really "W8A32". That is the point
of keeping it as a baseline, and :class:`ReferenceSummary` reports the real
count so tables never claim activations were quantized when they were not.

The result is a fake-quant model (float tensors holding quantized values);
its state dict saved with ``torch.save`` is the reference's file on disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ReferenceSummary:
    """What :func:`reference_quantize_` did: counts, so no table over-claims."""

    weight_bits: int
    activation_bits: int
    weight_layers: int  # Conv2d and Linear layers whose weights were quantized
    activation_quantizers: int  # nn.ReLU modules followed by a quantizer (0 on MobileNet-v2)
    relu6_modules: int  # nn.ReLU6 modules left unquantized, reported for honesty


def symmetric_minmax_fake_quant(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor symmetric min-max fake quantization of a weight tensor.

    The grid is the signed two's-complement one, ``-2**(b-1) .. 2**(b-1)-1``,
    with ``scale = max|w| / (2**(b-1)-1)``; 1 bit has no such grid (qmax = 0)
    and is rejected rather than silently redefined.

    >>> q, s = symmetric_minmax_fake_quant(torch.tensor([-1.0, 0.2, 0.6]), 2)
    >>> q.tolist(), float(s)
    ([-1.0, 0.0, 1.0], 1.0)
    """
    if bits < 2:
        raise ValueError(f"the reference quantizer needs at least 2 weight bits (symmetric grid), got {bits}")
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    scale = w.detach().abs().max().clamp_min(1e-12) / qmax
    q = torch.clamp(torch.round(w / scale), qmin, qmax)
    return q * scale, scale


class MinMaxActQuant(nn.Module):
    """Unsigned asymmetric min-max activation fake quantizer, observing while ``observing`` is set."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.observing = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    def freeze(self) -> None:
        """Compute scale and zero point from the observed range; later calls quantize."""
        lo = torch.clamp(self.min_val, max=0.0)  # the range must contain 0 so zero is exact
        hi = torch.clamp(self.max_val, min=0.0)
        qmax = 2**self.bits - 1
        self.scale.fill_(float(torch.clamp((hi - lo) / qmax, min=1e-12)))
        self.zero_point.fill_(float(torch.round(-lo / self.scale)))
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.min_val = torch.minimum(self.min_val, x.detach().min())
            self.max_val = torch.maximum(self.max_val, x.detach().max())
            return x
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, 2**self.bits - 1)
        return (q - self.zero_point) * self.scale


def reference_quantize_(model: nn.Module, weight_bits: int, activation_bits: int) -> ReferenceSummary:
    """Quantize ``model`` in place the reference way and return what was quantized.

    Weights are replaced by their fake-quantized values immediately (min-max
    needs no data); activation quantizers start in observing mode until
    :func:`reference_calibrate` has run.
    """
    n_weights = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                q, scale = symmetric_minmax_fake_quant(module.weight, weight_bits)
                module.weight.copy_(q)
                module.register_buffer("weight_scale", scale.reshape(()))
                n_weights += 1
    n_relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    n_act = _insert_after_relu(model, activation_bits)
    return ReferenceSummary(weight_bits, activation_bits, n_weights, n_act, n_relu6)


def _insert_after_relu(parent: nn.Module, bits: int) -> int:
    """Replace each child ``nn.ReLU`` (exactly that class, not ReLU6) by ReLU -> quantizer."""
    count = 0
    for name, child in list(parent.named_children()):
        if type(child) is nn.ReLU:
            setattr(parent, name, nn.Sequential(child, MinMaxActQuant(bits)))
            count += 1
        else:
            count += _insert_after_relu(child, bits)
    return count


@torch.no_grad()
def reference_calibrate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run calibration batches through the model, then freeze every activation quantizer."""
    model.eval()
    for x, _ in batches:
        model(x)
    for m in model.modules():
        if isinstance(m, MinMaxActQuant):
            m.freeze()
