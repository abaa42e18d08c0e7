"""Integer reference executor: the lowered model computed with integers only, as a deployment would.

It runs the program of :mod:`bitsweep.backend.lowering` on int64 tensors:
integer inputs times integer weights accumulated exactly, integer biases,
requantization as an integer multiply by ``m0`` and a rounding right shift
(round half up, written with shifts and masks), residual adds with
integer multipliers. Convolution sums are computed with float kernels on
integer values (float32 when the layer's worst-case sum is below 2**24,
float64 below 2**53: integer sums are exact there), converted back to int64.

It exists to check the simulation: :func:`compare` runs the fast integer-exact
simulation (:mod:`bitsweep.backend.simulate`, the source of every reported
accuracy), this reference and the fake-quant modules on the same images and
reports how often and by how much they differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.backend import lowering as lw
from bitsweep.backend.simulate import Simulator
from bitsweep.errors import BitsweepError


def round_shift(value: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``floor(value / 2**shift + 1/2)`` (round half up) for int64 ``value`` and ``shift >= 1``, in integer ops.

    >>> round_shift(torch.tensor([5, 6, 7, -5, -6, 10]), torch.tensor(2)).tolist()  # /4: 1.25 1.5 1.75 -1.25 -1.5 2.5
    [1, 2, 2, -1, -1, 3]
    """
    floor = value >> shift  # arithmetic shift: floor division by 2**shift
    rest = value - (floor << shift)  # in [0, 2**shift)
    return floor + (rest >= (torch.ones_like(shift) << (shift - 1))).to(torch.int64)


def _accumulate(s: lw.Accumulate, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if s.sum_bound < lw.FLOAT32_EXACT else torch.float64
    xi, w = x.to(dtype), s.weight.to(dtype)
    if s.op == "conv":
        acc = F.conv2d(xi, w, None, s.stride, s.padding, s.dilation, s.groups)
    else:
        acc = F.linear(xi, w)
    acc = acc.round().to(torch.int64)
    return acc + lw.channel_view(s.bias, acc.dim()) if s.bias is not None else acc


def _requantize(s: lw.Requantize, acc: torch.Tensor) -> torch.Tensor:
    if s.binary:
        if s.constant is not None:
            return torch.full_like(acc, s.constant)
        return torch.where(acc >= 0, 1, -1).to(torch.int64)
    q = round_shift(acc * lw.channel_view(s.m0, acc.dim()), lw.channel_view(s.shift, acc.dim()))
    return torch.clamp(q, s.lo, s.hi)


def _add(s: lw.AddGrids, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = a * s.ma + b * s.mb
    if s.binary:
        return torch.where(total >= 0, 1, -1).to(torch.int64)
    return torch.clamp(round_shift(total, torch.tensor(s.prec)), s.lo, s.hi)


@torch.no_grad()
def execute(program: lw.Program, x: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of ``program`` on the float images ``x``, with integer arithmetic throughout."""
    env: dict[str, torch.Tensor] = {}
    for s in program.steps:
        if isinstance(s, lw.QuantizeInput):
            v = env.get(s.src)
            v = x.cpu().float() if v is None else v
            if s.binary:
                env[s.dst] = torch.where(v >= 0, 1, -1).to(torch.int64)
            else:
                inv = 1.0 / s.scale.float()  # float32, as in the fake-quant formula
                env[s.dst] = torch.clamp(torch.round(v * inv), s.lo, s.hi).to(torch.int64)
        elif isinstance(s, lw.Accumulate):
            env[s.dst] = _accumulate(s, env[s.src])
        elif isinstance(s, lw.Requantize):
            env[s.dst] = _requantize(s, env[s.src])
        elif isinstance(s, lw.AddGrids):
            env[s.dst] = _add(s, env[s.a], env[s.b])
        elif isinstance(s, lw.PoolSum):
            v = env[s.src]
            if s.kernel is None:
                env[s.dst] = v.sum(dim=(-2, -1), keepdim=True)
            else:
                summed = F.avg_pool2d(v.double(), s.kernel, s.stride, divisor_override=1)
                env[s.dst] = summed.round().to(torch.int64)
        elif isinstance(s, lw.ClampInts):
            env[s.dst] = torch.clamp(env[s.src], s.lo, s.hi)
        elif isinstance(s, lw.Apply):
            v = env[s.src]
            env[s.dst] = lw.apply_op(s.op, v.double()).to(torch.int64) if s.op[0] == "maxpool" else lw.apply_op(s.op, v)
        elif isinstance(s, lw.Output):
            v = env[s.src]
            return (v.double() * lw.channel_view(s.scale, v.dim())).clamp(s.lo, s.hi).float()
    raise BitsweepError("the integer program has no output step")


@torch.no_grad()
def run_integer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (float32) of the converted ``model`` on ``x`` computed with integer arithmetic.

    Raises:
        BitsweepError: for an op the integer arithmetic does not cover (see ``bitsweep.backend.lowering``).
    """
    return execute(lw.lower(model, x), x)


@dataclass(frozen=True)
class Agreement:
    """How closely the simulation (and the fake-quant modules) match the integer reference."""

    images: int
    top1_agreement: float  # percent of images where the simulation and the reference predict the same class
    max_logit_diff: float  # simulation vs reference
    mean_abs_logit_diff: float
    simulated_top1: float | None  # percent correct, when labels were given
    integer_top1: float | None
    fakequant_top1: float | None  # the fake-quant modules (float convolutions), for comparison
    fakequant_agreement: float  # percent of images where fake-quant and the reference agree
    fakequant_max_logit_diff: float
    float32_exact: bool  # no layer's float32 sums could round (see Program.inexact)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def image_batches(batches: Any, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(images, labels or None)`` on the CPU in float32 from tensors or ``(images, labels)`` pairs, up to a count."""
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        yield x.cpu().float(), y


@torch.no_grad()
def compare(model: nn.Module, batches: Any, max_batches: int | None = None) -> Agreement:
    """Run the integer-exact simulation, the integer reference and the fake-quant model on the same images.

    Args:
        model: a converted quantized model (on CPU).
        batches: an iterable of image tensors or ``(images, labels)`` pairs (normalized float).
        max_batches: stop after this many batches.
    """
    model.eval()
    n = agree = fq_agree = sim_ok = int_ok = fq_ok = 0
    labelled = True
    max_diff = sum_diff = fq_max = 0.0
    program: lw.Program | None = None
    sim: Simulator | None = None
    for x, y in image_batches(batches, max_batches):
        if program is None:
            program = lw.lower(model, x)
            sim = Simulator(program)
        assert sim is not None
        s_logits = sim(x)
        ref = execute(program, x)
        fq = model(x).float()
        diff = (s_logits - ref).abs()
        max_diff = max(max_diff, float(diff.max()))
        fq_max = max(fq_max, float((fq - ref).abs().max()))
        sum_diff += float(diff.mean()) * x.shape[0]
        agree += int((s_logits.argmax(1) == ref.argmax(1)).sum())
        fq_agree += int((fq.argmax(1) == ref.argmax(1)).sum())
        if y is None:
            labelled = False
        else:
            y = y.cpu()
            sim_ok += int((s_logits.argmax(1) == y).sum())
            int_ok += int((ref.argmax(1) == y).sum())
            fq_ok += int((fq.argmax(1) == y).sum())
        n += x.shape[0]
    if n == 0 or program is None:
        raise BitsweepError("no images to compare; give at least one batch")

    def pct(k: int) -> float:
        return 100.0 * k / n

    return Agreement(
        images=n,
        top1_agreement=pct(agree),
        max_logit_diff=max_diff,
        mean_abs_logit_diff=sum_diff / n,
        simulated_top1=pct(sim_ok) if labelled else None,
        integer_top1=pct(int_ok) if labelled else None,
        fakequant_top1=pct(fq_ok) if labelled else None,
        fakequant_agreement=pct(fq_agree),
        fakequant_max_logit_diff=fq_max,
        float32_exact=program.float32_exact,
    )
