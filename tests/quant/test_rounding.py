"""Rounding policies and the integer check that learned methods go through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsweep.quant import ROUNDING_POLICIES, QuantConfig, ptq, rounding_policy, weight_spec
from bitsweep.quant.primitives import quantize
from bitsweep.quant.rounding import NearestRounding, check_integers
from bitsweep.quant.spec import QuantSpec

PER_CHANNEL = QuantSpec(4, granularity="per_channel")


class FloorRounding:
    """A policy a learned method could supply: always round down."""

    name = "floor"

    def __call__(self, weight, scale, zero_point, spec):  # type: ignore[no-untyped-def]
        s = scale.reshape(-1, *([1] * (weight.dim() - 1))) if scale.dim() else scale
        return torch.clamp(torch.floor(weight * (1.0 / s)), spec.qmin, spec.qmax).to(torch.int32)


def test_registry_has_nearest_and_rejects_unknown_names() -> None:
    assert list(ROUNDING_POLICIES) == ["nearest"]
    assert isinstance(rounding_policy("nearest"), NearestRounding)
    assert rounding_policy("nearest") is not rounding_policy("nearest")  # one instance per quantizer
    with pytest.raises(ValueError, match="unknown rounding policy 'adaround'; choose one of nearest"):
        rounding_policy("adaround")


def test_nearest_is_the_reference_quantize() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g)
    spec = weight_spec(4)
    scale = w.abs().amax(dim=(1, 2, 3)) / spec.qmax
    zp = torch.zeros(8, dtype=torch.int32)
    assert torch.equal(rounding_policy("nearest")(w, scale, zp, spec), quantize(w, scale, zp, spec))


def test_a_custom_policy_sets_the_converted_integers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    model = ptq(model, QuantConfig.from_bits(4, 8), [torch.randn(4, 1, 8, 8)]).model
    conv = model[0]
    nearest = conv.int_weight().clone()
    conv.weight_quantizer.rounding = FloorRounding()
    conv.convert_weight()
    s = conv.weight_quantizer.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(conv.int_weight(), torch.floor(conv.weight.detach() * (1.0 / s)).clamp(-7, 7).int())
    assert not torch.equal(conv.int_weight(), nearest)
    assert ((nearest - conv.int_weight()) >= 0).all()  # floor never exceeds nearest


@pytest.mark.parametrize(
    "q, scale, zp, spec, shape, message",
    [
        (torch.tensor([0.5]), torch.tensor(1.0), torch.tensor(0), QuantSpec(4), None, "whole numbers"),
        (torch.tensor([8]), torch.tensor(1.0), torch.tensor(0), QuantSpec(4), None, "-8..7"),
        (torch.tensor([0, 1]), torch.tensor(1.0), torch.tensor(0), QuantSpec(1), None, "-1 or \\+1"),
        (torch.zeros(2, 3), torch.ones(2), torch.zeros(2), QuantSpec(4), (3, 2), "shape \\(2, 3\\)"),
        (torch.zeros(2, 3), torch.ones(3), torch.zeros(3), PER_CHANNEL, None, "scale has 3 entries"),
        (torch.zeros(2, 3), torch.ones(2), torch.zeros(()), PER_CHANNEL, None, "zero_point has 1 entries"),
        (torch.zeros(2), torch.tensor(0.0), torch.tensor(0), QuantSpec(4), None, "positive and finite"),
        (torch.tensor([float("nan")]), torch.tensor(1.0), torch.tensor(0), QuantSpec(4), None, "whole numbers"),
    ],
)
def test_check_integers_rejects(q, scale, zp, spec, shape, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        check_integers(q, scale, zp, spec, shape)


def test_check_integers_accepts_float_whole_numbers_and_returns_int32() -> None:
    q = check_integers(torch.tensor([[-7.0, 7.0]]), torch.tensor([0.1]), torch.tensor([0]), weight_spec(4))
    assert q.dtype == torch.int32 and q.tolist() == [[-7, 7]]
