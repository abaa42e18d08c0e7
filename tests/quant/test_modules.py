"""Quantizer modules: settable integers, trainable scales (LSQ), and unchanged frozen behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitsweep.quant import ActivationQuantizer, QuantConfig, QuantConv2d, WeightQuantizer, ptq, weight_spec
from bitsweep.quant.primitives import dequantize, fake_quantize_reference, lsq_grad_scale
from bitsweep.quant.spec import QuantSpec


def _converted(w: int = 4, a: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    g = torch.Generator().manual_seed(1)
    return ptq(model, QuantConfig.from_bits(w, a), [torch.randn(8, 1, 8, 8, generator=g)]).model


def test_set_integers_replaces_what_the_layer_computes() -> None:
    model = _converted()
    conv: QuantConv2d = model[0]
    q = torch.randint(-7, 8, conv.weight.shape)
    scale = torch.rand(4) + 0.01
    conv.set_integers(q.float(), scale, torch.zeros(4))
    wq = conv.weight_quantizer
    assert torch.equal(wq.int_weight(), q.int()) and wq.int_weight().dtype == torch.int32
    assert torch.equal(wq.scale, scale) and wq.zero_point.dtype == torch.int32
    x = torch.randn(2, 1, 8, 8)
    expected = nn.functional.conv2d(model[0].input_quantizer(x), dequantize(q, scale, torch.zeros(4), wq.spec),
                                    conv.bias)  # fmt: skip
    torch.testing.assert_close(conv(x), expected, atol=0, rtol=0)


def test_set_integers_validates() -> None:
    conv: QuantConv2d = _converted()[0]
    before = conv.int_weight().clone()
    with pytest.raises(ValueError, match="shape"):
        conv.set_integers(torch.zeros(4, 1, 2, 2), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="-7..7"):
        conv.set_integers(torch.full(conv.weight.shape, 8), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="whole numbers"):
        conv.set_integers(torch.full(conv.weight.shape, 0.5), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="scale has 1 entries"):
        conv.set_integers(torch.zeros(conv.weight.shape), torch.ones(()), torch.zeros(()))
    assert torch.equal(conv.int_weight(), before)  # a refused call changes nothing


def test_weight_scale_learns_with_the_lsq_gradient() -> None:
    model = _converted()
    conv: QuantConv2d = model[0]
    frozen = conv.weight_quantizer.dequantized().clone()
    scale = conv.make_trainable()
    assert isinstance(scale, nn.Parameter) and conv.weight_mode == "qat"
    assert "weight_quantizer.scale" in dict(conv.named_parameters())
    w = conv._current_weight()
    assert torch.equal(w.detach(), frozen)  # same numbers as the frozen weight
    w.sum().backward()
    spec = conv.weight_quantizer.spec
    v = conv.weight.detach() / scale.detach().reshape(-1, 1, 1, 1)
    r = v.round()
    closed = torch.where(r < spec.qmin, float(spec.qmin), torch.where(r > spec.qmax, float(spec.qmax), r - v))
    g = lsq_grad_scale(conv.weight[0].numel(), spec)
    torch.testing.assert_close(scale.grad, closed.sum(dim=(1, 2, 3)) * g, rtol=1e-4, atol=1e-6)
    assert conv.weight.grad is not None


def test_freeze_keeps_the_learned_weight_scale() -> None:
    conv: QuantConv2d = _converted()[0]
    keys = set(conv.state_dict())
    scale = conv.make_trainable()
    with torch.no_grad():
        scale.mul_(1.5)
    learned = scale.detach().clone()
    conv.freeze()
    wq = conv.weight_quantizer
    assert not wq.trainable and conv.weight_mode == "quantize" and set(conv.state_dict()) == keys
    assert torch.equal(wq.scale, learned)
    assert torch.equal(wq.int_weight(), wq.rounding(conv.weight.detach(), learned, wq.zero_point, wq.spec))


def test_activation_scale_learns_and_frozen_forward_is_unchanged() -> None:
    q = _converted()[0].input_quantizer
    assert isinstance(q, ActivationQuantizer)
    x = torch.randn(2, 1, 8, 8) * 3
    frozen = q(x.clone())
    before = copy.deepcopy(q)
    s = q.make_trainable(grad_scale=False)
    y = q(x)
    assert torch.equal(y, frozen)
    with torch.no_grad():
        assert torch.equal(q(x), frozen)  # inference with a trainable scale: same numbers
    y.sum().backward()
    v = x / s.detach()
    r = v.round() + q.zero_point
    lo, hi = q.spec.qmin - q.zero_point, q.spec.qmax - q.zero_point
    closed = torch.where(r < q.spec.qmin, lo.float(), torch.where(r > q.spec.qmax, hi.float(), v.round() - v))
    torch.testing.assert_close(s.grad, closed.sum(), rtol=1e-4, atol=1e-4)
    q.freeze()
    assert not q.trainable and q._fast == before._fast and torch.equal(q(x.clone()), frozen)


def test_trainable_needs_qparams() -> None:
    with pytest.raises(ValueError, match="calibrate and convert"):
        ActivationQuantizer(QuantSpec(8, signed=False, symmetric=False)).make_trainable()
    with pytest.raises(ValueError, match="convert"):
        WeightQuantizer(weight_spec(4)).make_trainable()


def test_frozen_weight_quantizer_matches_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g)
    wq = WeightQuantizer(weight_spec(3), shape=tuple(w.shape))
    out = wq.compute(w)
    assert not wq.trainable and wq.rounding.name == "nearest"
    torch.testing.assert_close(out, fake_quantize_reference(w, wq.scale, wq.zero_point, wq.spec), atol=0, rtol=0)
