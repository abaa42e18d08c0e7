"""Numerics of the pure primitives: the reference formula, properties for every bit width, 1-bit safety."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsweep.quant.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_fast,
    fake_quantize_lsq,
    fake_quantize_reference,
    lsq_grad_scale,
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
    assert bool(inside.any())
    if not spec.binary:
        # Values more than half a step beyond the grid are clipped and get no gradient. (Half the range does not
        # always clip anything: a symmetric 2-bit grid [-2s, s] rounds values up to 1.5 s back inside.)
        v = x.detach() * (1.0 / scale) + zp
        beyond = (v < spec.qmin - 0.5) | (v > spec.qmax + 0.5)
        assert not bool(inside[beyond].any())


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


def _lsq_closed_form(x: torch.Tensor, s: torch.Tensor, z: int, spec: QuantSpec) -> torch.Tensor:
    """d/ds of sum((clamp(round(x/s) + z, qmin, qmax) - z) * s), round's derivative taken as 1 (LSQ, eq. 3)."""
    v = x / s
    r = torch.round(v)
    lo, hi = spec.qmin - z, spec.qmax - z
    return torch.where(r < lo, float(lo), torch.where(r > hi, float(hi), r - v)).sum()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 10_000))
def test_lsq_step_size_gradient_matches_the_closed_form(bits: int, signed: bool, seed: int) -> None:
    spec = QuantSpec(bits, signed=signed, symmetric=False)
    x = _data(seed, 1.5)
    z = 0 if signed else 2**bits // 4
    s0 = (x.max() - x.min()) / (spec.qmax - spec.qmin) * 0.7  # clips on both sides
    s = s0.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y = fake_quantize_lsq(xr, s, torch.tensor(z), spec)
    assert torch.equal(y, fake_quantize_reference(x, s0, torch.tensor(z), spec))  # the forward is the reference
    y.sum().backward()
    torch.testing.assert_close(s.grad, _lsq_closed_form(x, s0, z, spec), rtol=1e-4, atol=1e-4)
    r = torch.round(x * (1.0 / s0)) + z
    assert torch.equal(xr.grad, ((r >= spec.qmin) & (r <= spec.qmax)).float())  # straight-through for x


def test_lsq_gradient_on_a_small_tensor_by_hand() -> None:
    x = torch.tensor([0.26, -3.0, 0.9, 0.74])
    s = torch.tensor(0.5, requires_grad=True)
    fake_quantize_lsq(x, s, torch.tensor(0), QuantSpec(3), grad_scale=0.5).sum().backward()
    # levels -4..3: 0.52 -> 1 (1 - 0.52), -6 -> clipped to qmin (-4), 1.8 -> 2 (2 - 1.8), 1.48 -> 1 (1 - 1.48)
    assert s.grad.item() == pytest.approx(0.5 * ((1 - 0.52) - 4 + (2 - 1.8) + (1 - 1.48)), abs=1e-6)


def test_lsq_per_channel_scales_get_their_own_gradient() -> None:
    spec = QuantSpec(4, granularity="per_channel")
    w = _data(3, 1.0).reshape(1, -1)[:, :256].reshape(4, 64)
    s0 = w.abs().amax(dim=1) / 7 * 0.8
    s = s0.clone().requires_grad_(True)
    fake_quantize_lsq(w, s, torch.zeros(4, dtype=torch.int32), spec).sum().backward()
    expected = torch.stack([_lsq_closed_form(w[c], s0[c], 0, QuantSpec(4)) for c in range(4)])
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-4)


def test_lsq_binary_scale_gradient_is_the_sign() -> None:
    x = torch.tensor([0.3, -0.1, 2.0])
    s = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize_lsq(x, s, torch.tensor(0), QuantSpec(1))
    assert y.tolist() == [0.5, -0.5, 0.5]
    y.sum().backward()
    assert s.grad.item() == 1.0  # sign: +1 - 1 + 1


def test_lsq_grad_scale_formula() -> None:
    assert lsq_grad_scale(64, QuantSpec(4)) == pytest.approx(1 / (64 * 7) ** 0.5)
    assert lsq_grad_scale(0, QuantSpec(1, signed=True, symmetric=False)) == 1.0  # qmax 0 and no elements: no blow-up


@pytest.mark.parametrize("seed", range(40))
def test_training_paths_equal_the_reference_formula(seed: int) -> None:
    """The fused training forward (LSQ and STE) gives the reference formula's values, huge inputs included."""
    g = torch.Generator().manual_seed(seed)
    bits = int(torch.randint(2, 9, (1,), generator=g))
    signed, symmetric, per_channel = (bool(torch.randint(0, 2, (1,), generator=g)) for _ in range(3))
    spec = QuantSpec(bits, signed=signed, symmetric=symmetric,
                     granularity="per_channel" if per_channel else "per_tensor", channel_axis=1)  # fmt: skip
    x = torch.randn(3, 5, 4, 4, generator=g) * float(torch.rand(1, generator=g) * 10)
    x[0, 0, 0, :2] = torch.tensor([1e30, -1e30])
    shape = (5,) if per_channel else ()
    s = torch.rand(shape, generator=g) * 0.5 + 1e-3
    z = (torch.zeros(shape, dtype=torch.int32) if symmetric
         else torch.randint(spec.qmin, spec.qmax + 1, shape, generator=g, dtype=torch.int32))  # fmt: skip
    ref = fake_quantize_reference(x, s, z, spec)
    assert torch.equal(fake_quantize_lsq(x.clone().requires_grad_(True), s.clone().requires_grad_(True), z, spec), ref)
    assert torch.equal(fake_quantize(x.clone().requires_grad_(True), s, z, spec), ref)
