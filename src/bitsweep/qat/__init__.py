"""Quantization-aware training: learned step sizes (LSQ) or plain STE, distillation from the float model,
ending in a quantized checkpoint whose accuracy is integer-exact.

Two explicit steps for library users (:func:`prepare_qat`, train with any loop, :func:`convert_qat`),
and :func:`qat` / :func:`resume_qat` for the whole run on bitsweep's training loop (``bitsweep qat``).
"""

from bitsweep.qat.config import QAT_METHODS, QATConfig
from bitsweep.qat.distill import DistillationLoss
from bitsweep.qat.prepare import PreparedQAT, convert_qat, prepare_qat
from bitsweep.qat.run import QAT_TRAIN_DEFAULTS, QATResult, qat, resume_qat

__all__ = [
    "QAT_METHODS",
    "QAT_TRAIN_DEFAULTS",
    "DistillationLoss",
    "PreparedQAT",
    "QATConfig",
    "QATResult",
    "convert_qat",
    "prepare_qat",
    "qat",
    "resume_qat",
]
