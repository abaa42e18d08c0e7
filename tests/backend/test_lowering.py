"""Lowering a converted model: fixed-point constants, one step per op, a plan that is the same for every bit width."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bitsweep.backend import lowering as lw
from bitsweep.backend.intref import compare
from bitsweep.backend.simulate import INT16_PAIR_LIMIT, build, int8_pair_limit
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.inspect import weight_layers

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-9, 1e3), st.integers(1, 2**40))
def test_fixed_point_is_accurate_and_exact_in_float64(multiplier: float, bound: int) -> None:
    m0, shift = lw.fixed_point(torch.tensor([multiplier], dtype=torch.float64), bound)
    precision = min(31, 52 - bound.bit_length())
    approx = int(m0) * 2.0 ** -int(shift)
    if int(m0) == 0:  # below what any |acc| <= bound can show: every product rounds to 0
        assert multiplier * bound < 2.0**-9
    else:
        assert abs(approx - multiplier) <= multiplier * 2.0 ** -(precision - 1)
    assert bound * int(m0) < 2**52  # acc * m0 (and + 2**(shift-1)) are exact in float64 and int64


def test_steps_mirror_the_model(quantized: QuantFactory) -> None:
    model, _ = quantized(8, 8)
    program = lw.lower(model, torch.zeros(1, 1, 8, 8))
    kinds = [type(s).__name__ for s in program.steps]
    adds = sum(1 for m in model.modules() if type(getattr(m, "module", None)).__name__ == "Add")
    assert kinds.count("Accumulate") == len(weight_layers(model))
    assert kinds.count("AddGrids") == adds > 0
    assert kinds.count("QuantizeInput") == 1 and kinds[-1] == "Output"
    assert kinds.count("Requantize") >= len(weight_layers(model)) - 1  # every conv output goes back onto a grid


def test_plan_is_the_same_for_every_bit_width(quantized: QuantFactory) -> None:
    """What lets one compiled graph serve a whole sweep: only tensors change with the bit widths.

    One exception: on AVX2-only CPUs, 8-bit weights against 8-bit activations run each int8
    convolution as two weight parts (the int16 pair limit), so W8A8 has a plan of its own.
    """
    plans = {build(lw.lower(quantized(w, a)[0], torch.zeros(1, 1, 8, 8)), torch.device("cpu"))[0]
             for w, a in [(4, 4), (2, 8), (1, 1), (4, 8)]}  # fmt: skip
    assert len(plans) == 1
    w8a8 = build(lw.lower(quantized(8, 8)[0], torch.zeros(1, 1, 8, 8)), torch.device("cpu"))[0]
    assert (w8a8 in plans) == (int8_pair_limit() != INT16_PAIR_LIMIT)
    assert [step[:2] for step in w8a8] == [step[:2] for step in next(iter(plans))]  # the same ops


class _Res(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "add":
            return self.conv(x) + x
        return self.conv(x) * x  # a product of two tensors: no integer form here


def _converted(model: nn.Module) -> nn.Module:
    return ptq(model, QuantConfig.from_bits(8, 8), [torch.randn(4, 1, 8, 8)]).model


def test_functional_add_lowers_to_one_add_step_and_is_exact() -> None:
    model = _converted(_Res("add").eval())
    program = lw.lower(model, torch.zeros(1, 1, 8, 8))
    assert [type(s).__name__ for s in program.steps].count("AddGrids") == 1
    assert compare(model, [torch.randn(6, 1, 8, 8)]).max_logit_diff == 0.0


def test_unsupported_op_is_refused_with_one_error_naming_it() -> None:
    model = _converted(_Res("mul").eval())
    with pytest.raises(BitsweepError, match="mul"):
        lw.lower(model, torch.zeros(1, 1, 8, 8))


def test_wrong_input_shape_is_one_clear_error(quantized: QuantFactory) -> None:
    model, _ = quantized(8, 8)
    with pytest.raises(BitsweepError, match="inputs of shape"):
        lw.lower(model, torch.zeros(1, 3, 8, 8))
