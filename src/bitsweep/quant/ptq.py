"""``ptq``: the one post-training quantization entry point every caller uses.

The CLI, the sweep, the exporters and the benchmarks all quantize through
:func:`ptq`, so a new post-training method (equalization, bias correction,
learned rounding) lands here once and every caller gets it.

>>> import torch
>>> from torch import nn
>>> from bitsweep.quant import QuantConfig
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
>>> result = ptq(model, QuantConfig.from_bits(4, 8), [torch.randn(8, 1, 8, 8) for _ in range(2)])
>>> result.summary.weight_count, result.calibration_batches
(2, 2)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.api import CalibrationStats, QuantSummary, calibrate, convert, quantize_
from bitsweep.quant.config import QuantConfig


@dataclass(frozen=True)
class QuantizedModel:
    """What :func:`ptq` returns.

    Attributes:
        model: the converted model (the input model, changed in place), in eval mode.
        config: the recipe it was quantized with.
        summary: what ``quantize_`` did.
        stats: the bit-width-free calibration statistics (reusable for other configs of the same float model).
        calibration_batches: how many batches calibration really saw (can be fewer than asked for).
    """

    model: nn.Module
    config: QuantConfig
    summary: QuantSummary
    stats: CalibrationStats
    calibration_batches: int


def ptq(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Any] | None = None,
    *,
    num_batches: int | None = None,
    stats: CalibrationStats | None = None,
) -> QuantizedModel:
    """Quantize ``model`` in place: prepare, calibrate (or reuse ``stats``), convert.

    Args:
        model: a float model in eval mode (BatchNorm is folded per ``config.fold_bn``).
        config: the recipe.
        calibration: batches (tensors or ``(images, labels)``) on the model's device; ignored when
            ``stats`` is given.
        num_batches: calibrate on at most this many batches (None: all of ``calibration``).
        stats: statistics from an earlier calibration of the same float model, to skip calibrating again.

    Raises:
        BitsweepError: nothing to quantize, an empty calibration set, or neither calibration nor stats.
    """
    summary = quantize_(model, config)
    if stats is None:
        if calibration is None:
            raise BitsweepError("post-training quantization needs calibration images (or statistics from an earlier run)")
        stats = calibrate(model, calibration, num_batches)
    batches = max((s.batches for s in stats.values()), default=0)
    convert(model, stats)
    return QuantizedModel(model.eval(), config, summary, stats, batches)
