"""Confidence intervals of accuracy drops: coverage of the truth, determinism, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from bitsweep.errors import BitsweepError
from bitsweep.sweep.stats import DropInterval, drop_interval, paired_drop_interval


def test_paired_interval_is_deterministic_and_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(600) < 0.96
    quant = base.copy()
    quant[np.flatnonzero(base)[:8]] = False  # the quantized model loses 8 images, gains none
    paired = paired_drop_interval(base, quant, seed=3)
    assert paired == paired_drop_interval(base, quant, seed=3)
    assert paired.drop == pytest.approx(8 / 6)
    unpaired = drop_interval(600, base.mean() * 100, quant.mean() * 100)
    assert paired.low > 0  # 8 losses and no gains on the same images is not chance
    assert unpaired.low < 0 < unpaired.high  # without the pairing the same numbers look like noise
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_unpaired_interval_covers_the_true_drop() -> None:
    # 400 simulated splits of 600 images: true accuracies 96 % and 95 % -> true drop 1 point.
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        a, b = rng.binomial(600, 0.96) / 6, rng.binomial(600, 0.95) / 6
        ci = drop_interval(600, a, b)
        hits += ci.low <= 1.0 <= ci.high
    assert hits / 400 >= 0.93


def test_interval_narrows_with_more_images() -> None:
    small, large = drop_interval(300, 96.0, 95.0), drop_interval(3000, 96.0, 95.0)
    assert (large.high - large.low) < 0.4 * (small.high - small.low)


@pytest.mark.parametrize(
    ("low", "high", "words"),
    [(-0.5, 0.8, "within the 1-point budget"), (1.2, 3.0, "beyond the 1-point budget"), (-0.5, 3.0, "within noise")],
)
def test_verdict(low: float, high: float, words: str) -> None:
    assert DropInterval(0.5, low, high, 0.95, 600, "unpaired normal").verdict(1.0).startswith(words)


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(BitsweepError, match="at least one image"):
        drop_interval(0, 90.0, 80.0)
    with pytest.raises(BitsweepError, match="confidence must be one of"):
        drop_interval(100, 90.0, 80.0, confidence=0.5)
    with pytest.raises(BitsweepError, match="two equal, non-empty lists"):
        paired_drop_interval([True, False], [True])
