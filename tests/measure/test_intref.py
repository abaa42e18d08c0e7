"""The integer reference agrees with the fake-quant simulation and refuses what it cannot do."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.measure.intref import _requant, compare, run_integer
from bitsweep.quant import QuantConfig, calibrate, convert, quantize_

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@pytest.mark.parametrize(("weight_bits", "activation_bits"), [(8, 8), (4, 8), (8, 16)])
def test_agrees_with_simulation(quantized: QuantFactory, weight_bits: int, activation_bits: int) -> None:
    model, _ = quantized(weight_bits, activation_bits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (24,), generator=g)
    result = compare(model, [(x, labels)])
    with torch.no_grad():
        spread = float(model(x).std())
    assert result.images == 24
    assert result.top1_agreement >= 95.0
    # Integer rounding differs from float rounding by at most a few output steps.
    assert result.max_logit_diff < 0.1 * spread
    assert result.integer_top1 is not None and abs(result.integer_top1 - result.simulated_top1) <= 100.0 / 24 + 1e-9


def test_requant_matches_float_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**24), 2**24, (2, 3, 5, 5), generator=g)
    mult = torch.tensor([1.3e-4, 7.7e-6, 2.5e-3], dtype=torch.float64)
    got = _requant(acc, mult, 3, -(2**15), 2**15 - 1)
    want = torch.clamp(torch.floor(acc.double() * mult.reshape(1, 3, 1, 1) + 0.5) + 3, -(2**15), 2**15 - 1)
    assert (got - want.to(torch.int64)).abs().max() <= 1  # fixed-point vs exact real multiplier
    assert (got == want.to(torch.int64)).float().mean() > 0.99


def test_unsupported_activation_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    quantize_(model, QuantConfig.from_bits(8, 8))
    calibrate(model, [torch.randn(4, 1, 8, 8)], 1)
    convert(model)
    with pytest.raises(BitsweepError, match="SiLU"):
        run_integer(model, torch.randn(2, 1, 8, 8))
