"""Numerics of the pure primitives: the reference formula, properties for every bit width, 1-bit safety."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsweep.quant.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_fast,
    fake_quantize_reference,
    quantize,
)
from bitsweep.quant.spec import QuantSpec

specs = st.builds(
    QuantSpec,
    bits=st.integers(1, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
    narrow_range=st.just(False),
)


def _data(seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(257, generator=g) * scale


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 10_000), mag=st.floats(1e-3, 1e3))
def test_values_on_grid_error_bound_idempotent(spec: QuantSpec, seed: int, mag: float) -> None:
    x = _data(seed, mag)
    scale, zp = choose_qparams(x.min(), x.max(), spec)
    q = quantize(x, scale, zp, spec)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    y = fake_quantize(x, scale, zp, spec)
    assert torch.isfinite(y).all()
    assert torch.equal(fake_quantize(y, scale, zp, spec), y)  # idempotent: grid points map to themselves
    if not spec.binary:
        levels = (y / scale).round() * scale
        assert torch.allclose(y, levels, rtol=0, atol=float(scale) * 1e-3)
        lo, hi = dequantize(torch.tensor([spec.qmin, spec.qmax]), scale, zp, spec)
        inside = (x >= lo) & (x <= hi)
        err = (y - x).abs()[inside]
        assert (err <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()).all()


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 10_000))
def test_gradient_straight_through_inside_zero_outside(spec: QuantSpec, seed: int) -> None:
    x = _data(seed, 2.0)
    scale, zp = choose_qparams(x.min() * 0.5, x.max() * 0.5, spec)  # clip half the range
    x.requires_grad_(True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    if spec.binary:
        inside = x.detach().abs() <= scale
    else:
        r = torch.round(x.detach() * (1.0 / scale)) + zp
        inside = (r >= spec.qmin) & (r <= spec.qmax)
    assert torch.equal(x.grad, inside.float())
    assert bool((~inside).any()) or spec.bits >= 1  # the half range clips something for most draws


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 16), signed=st.booleans(), seed=st.integers(0, 1000))
def test_fast_path_equals_reference_bit_for_bit(bits: int, signed: bool, seed: int) -> None:
    spec = QuantSpec(bits, signed=signed, symmetric=False)
    x = _data(seed, 3.0).reshape(1, -1)
    scale, zp = choose_qparams(x.min() * 0.7, x.max() * 0.7, spec)
    inv = (1.0 / scale).item()
    fast = fake_quantize_fast(x, inv, scale.item(), float(spec.qmin - zp), float(spec.qmax - zp))
    ref = fake_quantize_reference(x, scale, zp, spec)
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)
    if bits >= 2:  # PyTorch's own fake-quant is the same formula
        theirs = torch.fake_quantize_per_tensor_affine(x, scale, zp, spec.qmin, spec.qmax)
        torch.testing.assert_close(theirs, ref, atol=0, rtol=0)


def test_one_bit_weights_are_binary_and_finite() -> None:
    from bitsweep.quant.observers import weight_qparams

    w = torch.randn(8, 4, 3, 3)
    w[3] = 0.0  # an all-zero channel must not give NaN
    spec = QuantSpec(1, granularity="per_channel")
    scale, zp = weight_qparams(w, spec)
    q = quantize(w, scale, zp, spec)
    assert set(q.unique().tolist()) <= {-1, 1}
    y = dequantize(q, scale, zp, spec)
    assert torch.isfinite(y).all() and torch.isfinite(scale).all() and (scale > 0).all()
    torch.testing.assert_close(scale[0], w[0].abs().mean())


def test_zero_range_gives_finite_everything() -> None:
    for bits in range(1, 17):
        for spec in (QuantSpec(bits), QuantSpec(bits, signed=False, symmetric=False)):
            x = torch.zeros(10)
            scale, zp = choose_qparams(x.min(), x.max(), spec)
            y = fake_quantize(x, scale, zp, spec)
            assert torch.isfinite(y).all() and torch.isfinite(scale).all()
            if spec.binary:  # zero is not a binary level: +scale, a harmless 1e-12
                assert (y.abs() <= 1e-12).all()
            else:
                assert torch.equal(y, x)
