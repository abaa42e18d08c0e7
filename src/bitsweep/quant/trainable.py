"""Trainable scales for a whole converted model: the seam LSQ, QAT and block reconstruction use.

>>> import torch
>>> from torch import nn
>>> from bitsweep.quant import QuantConfig, ptq
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
>>> model = ptq(model, QuantConfig.from_bits(4, 4), [torch.randn(8, 1, 8, 8)]).model
>>> scales = make_trainable(model)
>>> len(scales), all(s.requires_grad for s in scales)
(4, True)
>>> model(torch.randn(2, 1, 8, 8)).sum().backward()
>>> all(s.grad is not None for s in scales)
True
>>> model = freeze(model)
>>> any(isinstance(b, nn.Parameter) for b in (model[0].weight_quantizer.scale, model[0].input_quantizer.scale))
False
"""

from __future__ import annotations

from torch import nn

from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear
from bitsweep.quant.output import QuantOutput


def make_trainable(
    model: nn.Module,
    *,
    weights: bool = True,
    activations: bool = True,
    grad_scale: bool = True,
    learn_scales: bool = True,
) -> list[nn.Parameter]:
    """Turn the scales of a converted model into parameters trained with the LSQ gradient.

    Weight layers switch to fake-quantizing their weight every step (``weight_mode`` ``qat``), so
    both the weights and their scales learn. Clamp fusion is switched off while scales move: a
    clamp the old scale made redundant may matter under the new one (:func:`freeze` decides again).

    Args:
        model: a model after ``convert`` (or :func:`bitsweep.quant.ptq`).
        weights: learn weight scales.
        activations: learn activation scales.
        grad_scale: use LSQ's gradient scale ``1 / sqrt(elements * qmax)``.
        learn_scales: False trains with the plain straight-through estimator instead: weights are
            fake-quantized every step with scales the observer re-picks from the current weight, and
            activation scales stay as calibrated (the STE baseline of quantization-aware training).

    Returns:
        The new scale parameters, for the optimizer (they are also in ``model.parameters()``).
    """
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, QuantOutput):
            m.fused = False
        elif weights and isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_mode != "off":
            if learn_scales:
                params.append(m.make_trainable(grad_scale))
            else:
                m.train_weight()
        elif activations and learn_scales and isinstance(m, ActivationQuantizer) and m.mode == "quantize":
            params.append(m.make_trainable(grad_scale))
    return params


def freeze(model: nn.Module) -> nn.Module:
    """Keep the learned scales as buffers, choose the weight integers with them, and re-decide clamp fusion.

    Returns ``model`` (changed in place), ready for lowering, packing and export.
    """
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and (m.weight_quantizer.trainable or m.weight_mode == "qat"):
            m.freeze()
        elif isinstance(m, ActivationQuantizer) and m.trainable:
            m.freeze()
    for m in model.modules():
        if isinstance(m, QuantOutput):
            m.try_fuse()
    return model
