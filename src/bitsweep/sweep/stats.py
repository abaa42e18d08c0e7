"""How sure is an accuracy drop? Confidence intervals for "FP32 minus quantized" top-1 on the same images.

A validation split of a few hundred images moves in steps of several images per
point, so a 1.3-point loss can be chance. Two intervals, both in accuracy points:

* :func:`paired_drop_interval`: a paired bootstrap over per-image correctness of
  both models on the same images (exact for what was measured; needs the
  per-image results), deterministic for a given ``seed``.
* :func:`drop_interval`: from the two accuracies and the image count alone, a
  normal interval treating the two as independent binomials. It ignores that
  both models see the same images, so it is wider than the paired one
  (conservative): use it when per-image results were not kept.

:meth:`DropInterval.verdict` turns an interval and a budget into words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitsweep.errors import BitsweepError

# Two-sided standard-normal quantiles of the confidence levels offered.
_Z = {0.8: 1.2815515655446004, 0.9: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}


@dataclass(frozen=True)
class DropInterval:
    """An accuracy drop (points, positive = quantized is worse) with its confidence interval."""

    drop: float
    low: float
    high: float
    confidence: float
    images: int
    method: str  # "paired bootstrap" or "unpaired normal"

    def describe(self) -> str:
        """``drop 1.33 points (95 % CI -0.50 to 3.17, 600 images)``."""
        return (f"drop {self.drop:.2f} points ({self.confidence * 100:g} % CI {self.low:.2f} to {self.high:.2f}, "
                f"{self.images} images)")  # fmt: skip

    def verdict(self, max_drop: float) -> str:
        """Whether the drop is clearly within, clearly beyond, or within noise of the ``max_drop`` budget.

        >>> DropInterval(1.33, -0.5, 3.17, 0.95, 600, "unpaired normal").verdict(1.0)
        'within noise of the 1-point budget: the interval holds drops both within and beyond it'
        >>> DropInterval(0.1, -0.2, 0.4, 0.95, 600, "paired bootstrap").verdict(1.0)
        'within the 1-point budget'
        """
        if self.high <= max_drop:
            return f"within the {max_drop:g}-point budget"
        if self.low > max_drop:
            return f"beyond the {max_drop:g}-point budget"
        return f"within noise of the {max_drop:g}-point budget: the interval holds drops both within and beyond it"


def _z(confidence: float) -> float:
    if confidence not in _Z:
        raise BitsweepError(f"confidence must be one of {', '.join(map(str, sorted(_Z)))}, got {confidence}")
    return _Z[confidence]


def drop_interval(images: int, baseline_top1: float, top1: float, confidence: float = 0.95) -> DropInterval:
    """Normal interval of ``baseline_top1 - top1`` (percent) on ``images`` images, as independent binomials.

    >>> drop_interval(600, 95.67, 94.33).describe()
    'drop 1.34 points (95 % CI -1.16 to 3.83, 600 images)'
    """
    if images <= 0:
        raise BitsweepError(f"an interval needs at least one image, got {images}")
    p0, p1 = baseline_top1 / 100.0, top1 / 100.0
    # Agresti-Caffo: one success and one failure added to each proportion keeps the interval sane near 0 % / 100 %.
    q0, q1 = (p0 * images + 1) / (images + 2), (p1 * images + 1) / (images + 2)
    se = math.sqrt(q0 * (1 - q0) / (images + 2) + q1 * (1 - q1) / (images + 2))
    half = _z(confidence) * se * 100.0
    centre = (q0 - q1) * 100.0
    return DropInterval(baseline_top1 - top1, centre - half, centre + half, confidence, images, "unpaired normal")


def paired_drop_interval(
    baseline_correct: Sequence[bool] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> DropInterval:
    """Percentile bootstrap of the drop over images, resampling the (baseline, quantized) pairs together.

    Only images where the two models disagree move the drop, so two models that
    agree on all but a few images get a narrow interval even on a small split.

    >>> base = [True] * 590 + [False] * 10
    >>> quant = [True] * 585 + [False] * 15
    >>> paired_drop_interval(base, quant).describe()
    'drop 0.83 points (95 % CI 0.17 to 1.67, 600 images)'
    """
    a = np.asarray(baseline_correct, dtype=bool)
    b = np.asarray(correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise BitsweepError(f"per-image results must be two equal, non-empty lists, got {a.shape} and {b.shape}")
    _z(confidence)
    diff = a.astype(np.int8) - b.astype(np.int8)  # +1: only the baseline right, -1: only the quantized model right
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(resamples, diff.size))
    drops = diff[idx].mean(axis=1) * 100.0
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(drops, [tail, 1.0 - tail])
    return DropInterval(float(diff.mean() * 100.0), float(low), float(high), confidence, int(diff.size),
                        "paired bootstrap")  # fmt: skip


__all__ = ["DropInterval", "drop_interval", "paired_drop_interval"]
