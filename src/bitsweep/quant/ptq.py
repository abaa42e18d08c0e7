"""``ptq``: the one post-training quantization entry point every caller uses.

The CLI, the sweep, the exporters and the benchmarks all quantize through
:func:`ptq`, so a new post-training method (equalization, bias correction,
learned rounding) is registered once (``bitsweep.quant.methods.PTQ_METHODS``,
chosen by ``QuantConfig.method``) and every caller gets it.

>>> import torch
>>> from torch import nn
>>> from bitsweep.quant import QuantConfig
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
>>> result = ptq(model, QuantConfig.from_bits(4, 8), [torch.randn(8, 1, 8, 8) for _ in range(2)])
>>> result.summary.weight_count, result.calibration_batches
(2, 2)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.api import CalibrationStats, QuantSummary, calibrate, convert, quantize_
from bitsweep.quant.config import QuantConfig
from bitsweep.quant.methods import PTQ_METHODS, PTQContext, PTQMethod, get_method
from bitsweep.quant.scale_dtype import apply_scale_dtype

__all__ = ["PTQ_METHODS", "PTQContext", "PTQMethod", "QuantizedModel", "ptq"]


@dataclass(frozen=True)
class QuantizedModel:
    """What :func:`ptq` returns.

    Attributes:
        model: the converted model (the input model, changed in place), in eval mode.
        config: the recipe it was quantized with.
        summary: what ``quantize_`` did.
        stats: the bit-width-free calibration statistics (reusable for other configs of the same float model).
        calibration_batches: how many batches calibration really saw (can be fewer than asked for, when the
            loader runs out; with reused ``stats``, the batches those statistics came from).
    """

    model: nn.Module
    config: QuantConfig
    summary: QuantSummary
    stats: CalibrationStats
    calibration_batches: int


def _image(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def ptq(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Any] | None = None,
    *,
    num_batches: int | None = None,
    stats: CalibrationStats | None = None,
    options: Mapping[str, Any] | None = None,
) -> QuantizedModel:
    """Quantize ``model`` in place with ``config.method``: prepare, calibrate (or reuse ``stats``), convert.

    The method's steps (:class:`~bitsweep.quant.methods.PTQMethod`) run around that core: one on the
    float model before ``quantize_``, one on the converted model. Last, weight scales and biases are
    put on the ``config.scale_dtype`` grid (:func:`~bitsweep.quant.scale_dtype.apply_scale_dtype`).

    Args:
        model: a float model in eval mode (BatchNorm is folded per ``config.fold_bn``).
        config: the recipe.
        calibration: batches (tensors or ``(images, labels)``) on the model's device; read once. Only
            needed without ``stats``, or when the method learns from images.
        num_batches: calibrate on at most this many batches (None: all of ``calibration``).
        stats: statistics from an earlier calibration of the same float model, to skip calibrating again.
        options: settings of the method's steps (see :class:`~bitsweep.quant.methods.PTQContext`), e.g.
            ``{"images": 1024, "iterations": 500}`` for the learned-rounding methods.

    Raises:
        BitsweepError: nothing to quantize, an empty calibration set, a non-positive ``num_batches``,
            or no calibration images where the run needs them.
    """
    method = get_method(config.method)
    if num_batches is not None and num_batches <= 0:
        raise BitsweepError(f"calibration batches must be a positive whole number, got {num_batches}")
    images: tuple[Any, ...] = ()
    if method.needs_images:
        if calibration is None:
            raise BitsweepError(f"the '{method.name}' method learns from calibration images; pass a calibration loader")
        images = tuple(_image(b) for b in itertools.islice(calibration, num_batches))
        if not images:
            raise BitsweepError("the calibration set is empty; give a loader with at least one batch of images")
        calibration = images
    if method.restructure is not None:
        method.restructure(model)
    if method.before_prepare is not None:
        method.before_prepare(PTQContext(model, config, images, options=MappingProxyType(dict(options or {}))))
    float_model = copy.deepcopy(model) if method.needs_float_model else None
    summary = quantize_(model, config)
    if stats is None:
        if calibration is None:
            raise BitsweepError(
                "post-training quantization needs calibration images (or statistics from an earlier run)"
            )
        seen = [0]

        def counted(batches: Iterable[Any]) -> Generator[Any, None, None]:
            for b in batches:
                seen[0] += 1
                yield b

        stream = counted(calibration)
        try:
            stats = calibrate(model, stream, num_batches)
        finally:
            stream.close()
        batches = seen[0]
    else:
        batches = max((s.batches for s in stats.values()), default=0)
    convert(model, stats)
    if method.after_convert is not None:
        method.after_convert(
            PTQContext(model, config, images, stats, float_model, MappingProxyType(dict(options or {})))
        )
    apply_scale_dtype(model, config.scale_dtype)  # last: after any method changed integers, scales or biases
    return QuantizedModel(model.eval(), config, summary, stats, batches)
