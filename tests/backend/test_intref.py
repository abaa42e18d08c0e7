"""The integer reference: exact integer rounding, agreement with the simulation, clear refusals."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bitsweep.backend.intref import compare, round_shift, run_integer
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**52), 2**52), st.integers(1, 40))
def test_round_shift_is_round_half_up(value: int, shift: int) -> None:
    exact = Fraction(value, 2**shift) + Fraction(1, 2)
    want = exact.numerator // exact.denominator  # floor
    assert int(round_shift(torch.tensor([value]), torch.tensor([shift]))[0]) == want


@pytest.mark.parametrize(("weight_bits", "activation_bits"), [(8, 8), (4, 8), (2, 4), (1, 1)])
def test_simulation_equals_reference_exactly(quantized: QuantFactory, weight_bits: int, activation_bits: int) -> None:
    model, _ = quantized(weight_bits, activation_bits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 8, 8, generator=g)
    labels = torch.randint(0, 10, (24,), generator=g)
    result = compare(model, [(x[:16], labels[:16]), (x[16:], labels[16:])])
    assert result.images == 24
    assert result.float32_exact
    assert result.max_logit_diff == 0.0  # bit-identical logits, not merely close
    assert result.top1_agreement == 100.0
    assert result.simulated_top1 == result.integer_top1


def test_fake_quant_is_close_to_the_reference(quantized: QuantFactory) -> None:
    """An independent check of the lowering's constants: the float fake-quant model lands within a few steps."""
    model, _ = quantized(8, 8)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = run_integer(model, x)
    with torch.no_grad():
        fq = model(x)
    assert (fq - ref).abs().max() < 0.05 * float(fq.std())
    assert (fq.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_sixteen_bits_is_flagged_and_close(quantized: QuantFactory) -> None:
    model, _ = quantized(16, 16)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    result = compare(model, [x])
    assert not result.float32_exact  # 16-bit sums can pass 2**24 in float32
    assert result.max_logit_diff < 1e-3 * max(1.0, float(run_integer(model, x).abs().max()))


def test_unsupported_activation_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    model = ptq(model, QuantConfig.from_bits(8, 8), [torch.randn(4, 1, 8, 8)]).model
    with pytest.raises(BitsweepError, match="SiLU"):
        run_integer(model, torch.randn(2, 1, 8, 8))
