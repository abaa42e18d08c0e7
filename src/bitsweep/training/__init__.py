"""Training, evaluation and checkpoints: ``fit(config)`` writes a complete run directory."""

from bitsweep.training.checkpoint import (
    CheckpointInfo,
    check_compatible,
    checkpoint_info,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from bitsweep.training.evaluate import EvalResult, evaluate
from bitsweep.training.fit import FitResult, fit
from bitsweep.training.optim import WarmupCosineLR, build_optimizer, build_schedule, parameter_groups

__all__ = [
    "CheckpointInfo",
    "EvalResult",
    "FitResult",
    "WarmupCosineLR",
    "build_optimizer",
    "build_schedule",
    "check_compatible",
    "checkpoint_info",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_model",
    "parameter_groups",
    "save_checkpoint",
]
