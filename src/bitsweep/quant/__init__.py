"""Post-training quantization to any bit width: specs, pure primitives, observers, modules, and the API.

One call (:func:`ptq`)::

    result = ptq(model, QuantConfig.from_bits(4, 8), loader, num_batches=16)

or the three steps it makes::

    summary = quantize_(model, QuantConfig.from_bits(4, 8))   # fold BN, swap layers, add quantizers
    stats = calibrate(model, loader, num_batches=16)           # observe activations (bit-width free)
    convert(model)                                             # freeze qparams, quantize weights once
"""

from bitsweep.quant.api import (
    CalibrationStats,
    QuantSummary,
    activation_quantizers,
    calibrate,
    calibration,
    convert,
    quantize_,
)
from bitsweep.quant.config import LayerOverride, QuantConfig, activation_spec, weight_spec
from bitsweep.quant.fold import fold_batchnorm
from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear, QuantOutput, WeightQuantizer
from bitsweep.quant.observers import OBSERVERS, ActivationStats
from bitsweep.quant.ptq import QuantizedModel, ptq
from bitsweep.quant.spec import QuantSpec

__all__ = [
    "OBSERVERS",
    "ActivationQuantizer",
    "ActivationStats",
    "CalibrationStats",
    "LayerOverride",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantOutput",
    "QuantSpec",
    "QuantSummary",
    "QuantizedModel",
    "WeightQuantizer",
    "activation_quantizers",
    "activation_spec",
    "calibrate",
    "calibration",
    "convert",
    "fold_batchnorm",
    "ptq",
    "quantize_",
    "weight_spec",
]
