"""``QATConfig``: how quantization-aware training learns, as plain data.

The bit widths and ranges live in :class:`~bitsweep.quant.QuantConfig` (the same recipe PTQ uses);
this says how the quantized model is trained from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsweep.quant.methods import check_method

QAT_METHODS = ("lsq", "ste")


@dataclass(frozen=True)
class QATConfig:
    """The QAT recipe on top of a quantization config.

    Attributes:
        method: ``lsq`` learns every weight scale (per channel) and activation scale with the LSQ
            gradient (Esser et al., 2020); ``ste`` is the plain straight-through baseline: weight scales
            re-picked by the observer every step, activation scales fixed at their calibrated values.
        init: the post-training method whose result training starts from (a name in ``PTQ_METHODS``).
        distill: learn from the float model's soft predictions as well as the labels.
        temperature: softmax temperature of the distillation term.
        distill_weight: weight of the distillation term; the label cross-entropy gets ``1 - distill_weight``.
        calib_batches: training batches the initial calibration sees.
    """

    method: str = "lsq"
    init: str = "rtn"
    distill: bool = True
    temperature: float = 2.0
    distill_weight: float = 0.9
    calib_batches: int = 16

    def __post_init__(self) -> None:
        if self.method not in QAT_METHODS:
            raise ValueError(f"unknown QAT method {self.method!r}; choose one of {', '.join(QAT_METHODS)}")
        check_method(self.init)
        if not self.temperature > 0:
            raise ValueError(f"the distillation temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"the distillation weight must be in [0, 1], got {self.distill_weight}")
        if self.calib_batches <= 0:
            raise ValueError(f"calibration batches must be a positive whole number, got {self.calib_batches}")
