"""Pure quantization functions: bits are plain data, no state, no modules.

The reference formula, which every other path in bitsweep must match bit for
bit (tests compare with ``atol=0, rtol=0``)::

    inv_scale = 1 / scale                                  # float32
    q     = clamp(round_half_even(x * inv_scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Multiplying by a float32 ``inv_scale`` (not dividing by ``scale``) is what
``torch.fake_quantize_per_tensor_affine`` does, so our numbers equal PyTorch's
own fake-quant. Binary grids (1-bit signed symmetric) are the one exception:
``q = +1 if x >= 0 else -1`` and ``x_hat = q * scale``.

Scales are never below :data:`SCALE_EPS`, so an all-zero tensor or channel
gets a harmless scale instead of a division by zero, and no bit width can
produce NaN or inf.

>>> import torch
>>> from bitsweep.quant.spec import QuantSpec
>>> spec = QuantSpec(4)                       # signed symmetric, levels -8..7
>>> x = torch.tensor([-1.0, -0.2, 0.0, 0.33, 0.7])
>>> scale, zp = choose_qparams(x.min(), x.max(), spec)
>>> quantize(x, scale, zp, spec).tolist()
[-7, -1, 0, 2, 5]
>>> fake_quantize(x, scale, zp, spec).tolist()[:2] == [-1.0, (-1 * scale).item()]
True
"""

from __future__ import annotations

import math

import torch

from bitsweep.quant.spec import QuantSpec, qrange

__all__ = [
    "SCALE_EPS",
    "qrange",
    "choose_qparams",
    "binary_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_bias",
    "fake_quantize_reference",
    "fake_quantize_fast",
    "fake_quantize_lsq",
    "lsq_grad_scale",
]

SCALE_EPS = 1e-12  # smallest scale; 1 / SCALE_EPS is still finite in float32


def _broadcast(t: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View a per-channel vector (C,) as (1, .., C, .., 1) along ``spec.channel_axis`` of ``x``."""
    if t.dim() == 0 or t.numel() == 1 or not spec.per_channel:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[spec.channel_axis] = -1
    return t.reshape(shape)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero_point (int32) that map [min_val, max_val] onto the grid of ``spec``.

    The range is first widened to include 0, so zero (padding, ReLU's floor)
    is always exactly representable. Symmetric grids take the scale from
    max |x| over the positive side ``qmax`` (``max|x| / qmax``), so no value
    is clipped; asymmetric grids spread ``max - min`` over all levels.

    >>> s, z = choose_qparams(torch.tensor(0.0), torch.tensor(2.55), QuantSpec(8, signed=False, symmetric=False))
    >>> round(s.item(), 6), z.item()
    (0.01, 0)
    >>> s, z = choose_qparams(torch.tensor(-0.5), torch.tensor(2.05), QuantSpec(8, signed=False, symmetric=False))
    >>> z.item()
    50
    >>> choose_qparams(torch.tensor(0.0), torch.tensor(0.0), QuantSpec(3))[0].item() > 0
    True
    """
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val) if spec.signed else max_val
        scale = amax / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (max_val - min_val) / float(qmax - qmin)
        scale = torch.clamp(scale, min=SCALE_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    scale = torch.clamp(scale, min=SCALE_EPS).to(torch.float32)
    return scale, zero_point


def binary_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """XNOR-Net scale for binary weights: mean |w| per channel (or over the tensor).

    For ``w_hat = sign(w) * s`` the squared error is smallest at ``s = mean|w|``.

    >>> binary_scale(torch.tensor([[1.0, -3.0], [0.0, 0.0]]), QuantSpec(1, granularity="per_channel")).tolist()[0]
    2.0
    """
    a = w.detach().float().abs()
    if spec.per_channel:
        a = a.movedim(spec.channel_axis, 0).reshape(a.shape[spec.channel_axis], -1)  # (C, rest)
        s = a.mean(dim=1)
    else:
        s = a.mean()
    return torch.clamp(s, min=SCALE_EPS).to(torch.float32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer levels (int32) of ``x``: the reference formula's ``q``.

    >>> quantize(torch.tensor([-0.3, 0.0, 0.2]), torch.tensor(0.1), torch.tensor(0), QuantSpec(1))
    tensor([-1,  1,  1], dtype=torch.int32)
    >>> quantize(torch.tensor([0.24, -0.36, 9.0]), torch.tensor(0.1), torch.tensor(0), QuantSpec(3))
    tensor([ 2, -4,  3], dtype=torch.int32)
    """
    if spec.binary:
        return torch.where(x >= 0, 1, -1).to(torch.int32)
    s = _broadcast(scale.float(), x, spec)
    z = _broadcast(zero_point, x, spec)
    inv = 1.0 / s
    q = torch.clamp(torch.round(x.float() * inv) + z, spec.qmin, spec.qmax)
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Real values (float32) of integer levels: ``(q - zero_point) * scale``.

    >>> dequantize(torch.tensor([0, 3]), torch.tensor(0.5), torch.tensor(1), QuantSpec(4, symmetric=False)).tolist()
    [-0.5, 1.0]
    """
    s = _broadcast(scale.float(), q, spec)
    z = _broadcast(zero_point, q, spec)
    return (q.float() - z) * s


def fake_quantize_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """``dequantize(quantize(x))`` spelled out step by step: the definition the fast paths must equal."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)


def _levels(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, inside, v, c)`` of a non-binary grid in seven elementwise passes, for training.

    ``v = x / s`` in grid steps, ``c`` its level relative to the zero point clamped to the grid, ``inside``
    where rounding needed no clamp, ``out = c * s``: equal to :func:`fake_quantize_reference` (the zero
    point is an integer and levels stay below 2**24, so clamping around it is exact; see
    :func:`fake_quantize_fast`), without its integer round trip.
    """
    s = _broadcast(scale.detach().float(), x, spec)
    v = x.detach().float() * (1.0 / s)
    r = torch.round(v)
    if zero_point.numel() == 1 and not torch.compiler.is_compiling():  # .item() would break a compiled graph
        z = int(zero_point.reshape(()).item())
        c = torch.clamp(r, float(spec.qmin - z), float(spec.qmax - z))
    else:
        z_t = _broadcast(zero_point, x, spec).float()
        c = torch.clamp(r, spec.qmin - z_t, spec.qmax - z_t)
    inside = c == r
    return c * s, inside, v, c


class _FakeQuantSTE(torch.autograd.Function):
    """Fake-quant with the straight-through estimator: gradient 1 inside the grid's range, 0 outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # type: ignore[no-untyped-def]
        if spec.binary:
            out = fake_quantize_reference(x, scale, zero_point, spec)
            inside = x.abs() <= _broadcast(scale.float(), x, spec)
        else:
            out, inside, _, _ = _levels(x, scale, zero_point, spec)
        ctx.save_for_backward(inside)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``x``; differentiable with a straight-through gradient.

    The gradient is passed unchanged where ``x`` lands inside the grid
    (before clamping) and is zero where it was clipped, so QAT learns to pull
    clipped values back into range.

    >>> x = torch.tensor([-2.0, 0.1, 5.0], requires_grad=True)
    >>> y = fake_quantize(x, torch.tensor(0.5), torch.tensor(0), QuantSpec(3))  # levels -2.0 .. 1.5
    >>> y.tolist()
    [-2.0, 0.0, 1.5]
    >>> y.sum().backward(); x.grad.tolist()
    [1.0, 1.0, 0.0]
    """
    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _FakeQuantSTE.apply(x, scale, zero_point, spec)  # type: ignore[no-untyped-call]
        return out
    return fake_quantize_reference(x, scale, zero_point, spec).to(x.dtype)


class _FakeQuantLSQ(torch.autograd.Function):
    """Fake-quant with a learned step size (LSQ): gradients for ``x`` (straight-through) and ``scale``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, grad_scale):  # type: ignore[no-untyped-def]
        if spec.binary:
            out = fake_quantize_reference(x, scale, zero_point, spec)
            xf = x.detach().float()
            inside = xf.abs() <= _broadcast(scale.detach().float(), x, spec)
            d_scale = torch.where(xf >= 0, 1.0, -1.0)  # x_hat = s * sign(x)
        else:
            # d x_hat / d s: round(v) - v inside the grid, the clamped level (qmin - z or qmax - z) outside
            out, inside, v, c = _levels(x, scale, zero_point, spec)
            d_scale = torch.where(inside, c - v, c)
        ctx.save_for_backward(inside, d_scale)
        ctx.spec, ctx.scale_shape, ctx.grad_scale = spec, scale.shape, grad_scale
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        inside, d_scale = ctx.saved_tensors
        spec, shape = ctx.spec, ctx.scale_shape
        if spec.per_channel and math.prod(shape) > 1:
            g = grad.float() * d_scale
            g = g.movedim(spec.channel_axis, 0).reshape(g.shape[spec.channel_axis], -1).sum(dim=1)  # (C,)
        else:
            g = (grad.float() * d_scale).sum()
        return grad * inside.to(grad.dtype), (g * ctx.grad_scale).reshape(shape), None, None, None


def fake_quantize_lsq(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, grad_scale: float = 1.0
) -> torch.Tensor:
    """Fake-quant whose step size learns (Esser et al., 2020, "Learned Step Size Quantization").

    The forward value is the reference formula's, bit for bit. The backward
    pass gives ``x`` the straight-through gradient of :func:`fake_quantize`
    and gives ``scale`` (per tensor or per channel) the LSQ gradient of
    ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s``: ``round(x/s) - x/s``
    where ``x`` lands inside the grid, ``qmin - z`` below it and ``qmax - z``
    above it (binary grids: ``sign(x)``), times ``grad_scale`` (see
    :func:`lsq_grad_scale`). The zero point stays fixed.

    >>> x, s = torch.tensor([0.26, -3.0, 0.9]), torch.tensor(0.5, requires_grad=True)
    >>> y = fake_quantize_lsq(x, s, torch.tensor(0), QuantSpec(3))  # levels -2.0 .. 1.5
    >>> y.tolist()
    [0.5, -2.0, 1.0]
    >>> y.sum().backward(); round(s.grad.item(), 4)  # (1 - 0.52) + (-4) + (2 - 1.8)
    -3.32
    """
    out: torch.Tensor = _FakeQuantLSQ.apply(x, scale, zero_point, spec, float(grad_scale))  # type: ignore[no-untyped-call]
    return out


def lsq_grad_scale(elements: int, spec: QuantSpec) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(elements * qmax)``.

    ``elements`` is how many values share one scale in one sample (a weight's
    elements per channel, an activation's elements per image), so the scale
    learns at about the pace of the values it serves.

    >>> round(lsq_grad_scale(100, QuantSpec(8, signed=False)), 5)
    0.00626
    """
    return 1.0 / math.sqrt(max(elements, 1) * max(spec.qmax, 1))


def fake_quantize_fast(
    x: torch.Tensor, inv_scale: float, scale: float, lo: float, hi: float, inplace: bool = False
) -> torch.Tensor:
    """Per-tensor fake-quant in four elementwise passes, for inference.

    With ``inplace=True`` it overwrites ``x`` (no new allocation), for callers
    that own a fresh tensor nobody else reads.

    Equal bit for bit to the reference formula when ``inv_scale`` is the
    float32 value of ``1 / scale``, ``lo = qmin - zero_point`` and
    ``hi = qmax - zero_point``: adding the integer zero_point, clamping and
    subtracting it again is exact in float32 for |levels| < 2**24, so
    ``clamp(round(x * inv_scale), lo, hi) * scale`` is the same number.

    >>> s, x = torch.tensor(0.1), torch.tensor([0.26, -5.0, 9.0])
    >>> fast = fake_quantize_fast(x, (1.0 / s).item(), s.item(), -3.0, 4.0)
    >>> ref = fake_quantize_reference(x, s, torch.tensor(3), QuantSpec(3, signed=False, symmetric=False))
    >>> torch.equal(fast, ref)
    True
    """
    y = x.mul_(inv_scale) if inplace else x.mul(inv_scale)
    y.round_()
    y.clamp_(lo, hi)
    return y.mul_(scale)


def fake_quantize_bias(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``round(bias / step) * step`` with the straight-through gradient: the bias an integer program adds.

    The integer program adds each layer's bias as an integer on the accumulator's grid, whose step is
    the input scale times the weight scale (per channel), rounded in float64 (as
    :mod:`bitsweep.backend.lowering` does). At 4 bits that grid is coarse (a step can be a tenth of
    the output's), and a model trained with its float bias loses points when the bias is rounded
    afterwards; training through this function sees the rounded bias. ``step`` is float64 and
    broadcasts against ``bias``; only ``bias`` gets a gradient.

    >>> b = torch.tensor([0.26, -0.74], requires_grad=True)
    >>> y = fake_quantize_bias(b, torch.tensor([0.5, 0.5], dtype=torch.float64))
    >>> y.tolist()
    [0.5, -0.5]
    >>> y.sum().backward(); b.grad.tolist()
    [1.0, 1.0]
    """
    rounded = (torch.round(bias.detach().double() / step) * step).to(bias.dtype)
    return rounded + (bias - bias.detach())  # exactly ``rounded`` forward (x - x == 0), identity backward
