"""QAT as two explicit steps, as torchao does it: ``prepare_qat`` then (after training) ``convert_qat``.

``prepare_qat`` starts from a post-training result (any registered PTQ method: the better the start,
the less training is needed), so every scale begins where calibration put it, and switches the
converted model to training: each weight layer fake-quantizes its weight every step, and with LSQ
each weight scale (per channel) and activation scale becomes a parameter. Each layer also rounds
its bias onto its accumulator grid (input scale times weight scale) in forward, as the integer
program adds it (:mod:`bitsweep.quant.bias_grid`), so the accuracy QAT validates each epoch is the
one the integer program gets.

BatchNorm: quantization folds it into the convolution before anything is quantized, and QAT trains
the folded weights and biases directly (no BatchNorm runs during QAT). The trained model is exactly
what the integer program computes, with no statistics to re-estimate and no fold to redo after
training; the cost is that the folded model trains without BatchNorm's normalization, which is fine
for a few epochs of fine-tuning from a converged float model at a small learning rate.

>>> import torch
>>> from torch import nn
>>> from bitsweep.quant import QuantConfig
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
>>> prepared = prepare_qat(model, QuantConfig.from_bits(2, 4), [torch.randn(8, 1, 8, 8)])
>>> len(prepared.scales)  # 2 weight layers' scales + the input's and the ReLU6 output's (logits stay 32-bit)
4
>>> model(torch.randn(2, 1, 8, 8)).sum().backward()
>>> converted = convert_qat(model)
>>> sorted(set(converted[0].int_weight().flatten().tolist())) <= [-1, 0, 1]
True
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.qat.config import QATConfig
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.bias_grid import bind_bias_grids
from bitsweep.quant.modules import QuantConv2d, QuantLinear
from bitsweep.quant.primitives import quantize
from bitsweep.quant.ptq import QuantizedModel
from bitsweep.quant.scale_dtype import apply_scale_dtype
from bitsweep.quant.trainable import freeze, make_trainable


@dataclass(frozen=True)
class PreparedQAT:
    """A model ready for quantization-aware training.

    Attributes:
        model: the model (changed in place), in training mode with fake-quant in the loop.
        start: what the initial post-training quantization did (its summary and statistics).
        scales: the learned-step-size parameters (empty for ``ste``); they are also in ``model.parameters()``.
    """

    model: nn.Module
    start: QuantizedModel
    scales: list[nn.Parameter]


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Any],
    qat: QATConfig | None = None,
    *,
    num_batches: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> PreparedQAT:
    """Quantize ``model`` in place with ``qat.init`` (calibrated on ``calibration``) and make it trainable.

    Args:
        model: a float model in eval mode.
        config: bit widths and ranges (its ``method`` is replaced by ``qat.init``).
        calibration: batches (tensors or ``(images, labels)``) on the model's device.
        qat: the QAT recipe (default ``QATConfig()``).
        num_batches: calibrate on at most this many batches (default ``qat.calib_batches``).
        options: settings of the initial PTQ method (see :func:`bitsweep.quant.ptq`).

    Raises:
        BitsweepError: nothing to quantize or no calibration images (from :func:`~bitsweep.quant.ptq`).
    """
    qat = qat if qat is not None else QATConfig()
    start = ptq(
        model,
        dataclasses.replace(config, method=qat.init),
        calibration,
        num_batches=num_batches or qat.calib_batches,
        options=options,
    )
    _start_from_chosen_integers(model)
    _round_biases_in_training(model)  # before the scales become parameters: fx traces buffers more simply
    scales = make_trainable(model, learn_scales=qat.method == "lsq")
    if not any(p.requires_grad for p in model.parameters()):
        raise BitsweepError("the model has no trainable weights left after quantization; nothing to fine-tune")
    return PreparedQAT(model.train(), start, scales)


def _round_biases_in_training(model: nn.Module) -> None:
    """Train through the biases the integer program adds (rounded on each layer's accumulator grid).

    A W4A4 run that trained float biases reached 89.78 % validation accuracy in fake-quant and 87.62 %
    integer-exact: the rounding it never saw cost 2.2 points. A model the integer lowering cannot
    walk keeps float biases (its accuracy is not integer-exact anyway), with a warning.
    """
    try:
        bind_bias_grids(model)
    except BitsweepError as e:
        warnings.warn(f"QAT trains float biases ({e}); the integer program may round them differently", stacklevel=3)


@torch.no_grad()
def _start_from_chosen_integers(model: nn.Module) -> None:
    """Move each float weight onto the grid level its PTQ method chose, where that is not nearest rounding.

    QAT trains float weights and rounds them to nearest; learned rounding (AdaRound, BRECQ, QDrop)
    picked some other levels. Starting from those levels (the dequantized weight) keeps the method's
    result as QAT's starting point instead of silently falling back to round-to-nearest.
    """
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_mode == "quantize":
            wq = m.weight_quantizer
            nearest = quantize(m.weight, wq.scale.detach(), wq.zero_point, wq.spec)
            if not torch.equal(nearest, wq.q.to(nearest.device)):
                m.weight.copy_(wq.dequantized().to(m.weight.dtype))


def convert_qat(model: nn.Module, scale_dtype: str = "float32") -> nn.Module:
    """End training: keep the learned scales, choose every weight's integers with them, and freeze.

    The result is a converted model like :func:`~bitsweep.quant.ptq`'s (eval mode), ready for the
    integer program, the packed file and ONNX export.

    Args:
        model: the trained model from :func:`prepare_qat` (changed in place).
        scale_dtype: the ``QuantConfig.scale_dtype`` it was prepared with; ``float16`` puts the learned
            weight scales and the trained biases on the float16 grid (integers chosen with the rounded
            scales), as :func:`~bitsweep.quant.ptq` does, so the packed file can store them in 2 bytes.
    """
    return apply_scale_dtype(freeze(model), scale_dtype).eval()
