"""Post-training quantization to any bit width: specs, pure primitives, observers, modules, and the API.

One call (:func:`ptq`)::

    result = ptq(model, QuantConfig.from_bits(4, 8), loader, num_batches=16)

or the three steps it makes::

    summary = quantize_(model, QuantConfig.from_bits(4, 8))   # fold BN, swap layers, add quantizers
    stats = calibrate(model, loader, num_batches=16)           # observe activations (bit-width free)
    convert(model)                                             # freeze qparams, quantize weights once

Seams for learned methods: ``QuantConfig.method`` picks a post-training method from
``PTQ_METHODS`` (what :func:`ptq` runs around those steps); observers and rounding
policies are registries (``OBSERVERS``, ``ROUNDING_POLICIES``); weight quantizers take
integers an algorithm chose (``set_integers``); :func:`make_trainable` turns scales into
parameters learned with the LSQ gradient and :func:`freeze` keeps what they learned.
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
from bitsweep.quant.methods import PTQ_METHODS, PTQContext, PTQMethod
from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear, WeightQuantizer
from bitsweep.quant.observers import OBSERVERS, ActivationStats, Observer
from bitsweep.quant.output import QuantOutput
from bitsweep.quant.ptq import QuantizedModel, ptq
from bitsweep.quant.rounding import ROUNDING_POLICIES, RoundingPolicy, rounding_policy
from bitsweep.quant.spec import QuantSpec
from bitsweep.quant.trainable import freeze, make_trainable

__all__ = [
    "OBSERVERS",
    "PTQ_METHODS",
    "ROUNDING_POLICIES",
    "ActivationQuantizer",
    "ActivationStats",
    "CalibrationStats",
    "LayerOverride",
    "Observer",
    "PTQContext",
    "PTQMethod",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantOutput",
    "QuantSpec",
    "QuantSummary",
    "QuantizedModel",
    "RoundingPolicy",
    "WeightQuantizer",
    "activation_quantizers",
    "activation_spec",
    "calibrate",
    "calibration",
    "convert",
    "fold_batchnorm",
    "freeze",
    "make_trainable",
    "ptq",
    "quantize_",
    "rounding_policy",
    "weight_spec",
]
