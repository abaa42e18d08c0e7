"""The integer program: what a lowered model is made of (plain data, no torch.fx).

:func:`bitsweep.backend.lowering.lower` writes these steps; :mod:`bitsweep.backend.intref`
and :mod:`bitsweep.backend.simulate` execute them. The arithmetic each step stands for is
spelled out in the lowering module's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bitsweep.errors import BitsweepError

FLOAT32_EXACT = 2**24  # every integer below this is exact in float32, and so is every partial sum
FLOAT64_EXACT = 2**53


@dataclass(frozen=True)
class Grid:
    """Centered integers ``q - zero_point`` in ``[lo, hi]``; real value = integer * scale."""

    scale: float
    lo: int
    hi: int
    binary: bool = False

    @property
    def amax(self) -> int:
        """Largest magnitude an integer on this grid can have."""
        return max(abs(self.lo), abs(self.hi))


@dataclass(frozen=True)
class Acc:
    """A wide accumulator: real value = acc * scale[c] (dim 1), with a pending clamp in real units."""

    scale: torch.Tensor  # float64 (C,) or (1,)
    bound: int  # worst-case |acc|
    dim: int  # number of dimensions of the tensor (channels are dim 1)
    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True)
class QuantizeInput:
    """Float input -> centered integers with the input quantizer's formula."""

    src: str
    dst: str
    scale: torch.Tensor  # float32 0-d
    lo: int
    hi: int
    binary: bool


@dataclass(frozen=True)
class Accumulate:
    """Conv2d or Linear of centered integers with centered integer weights, plus the integer bias."""

    src: str
    dst: str
    op: str  # "conv" | "linear"
    weight: torch.Tensor  # int64, weight shape, zero point removed
    bias: torch.Tensor | None  # int64 (C_out,)
    bound: int  # worst-case |acc|, bias included (sets the fixed-point precision downstream)
    sum_bound: int  # worst-case |sum(x * w)| without the bias: float32 sums are exact below 2**24
    x_lo: int = 0  # range of the input integers (for choosing integer kernels)
    x_hi: int = 0
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1


@dataclass(frozen=True)
class Requantize:
    """Accumulator or grid -> grid: ``clamp((acc * m0 + 2**(shift-1)) >> shift, lo, hi)`` per channel.

    The shift rounds half up.
    """

    src: str
    dst: str
    m0: torch.Tensor  # int64 (C,) or (1,)
    shift: torch.Tensor  # int64, same shape
    lo: int
    hi: int
    dim: int  # dimensions of the input (channels are dim 1)
    binary: bool = False  # +1 where acc >= 0, else -1 (m0 > 0, so the sign of acc decides)
    constant: int | None = None  # binary output fixed by a pending clamp (+1 or -1), else None


@dataclass(frozen=True)
class AddGrids:
    """Residual add of two grids onto the output grid with integer multipliers ``ma``, ``mb``.

    ``q = clamp((a * ma + b * mb + 2**(prec-1)) >> prec, lo, hi)``; a binary output takes the sign of the sum.
    """

    a: str
    b: str
    dst: str
    ma: int
    mb: int
    prec: int
    lo: int
    hi: int
    binary: bool = False


@dataclass(frozen=True)
class PoolSum:
    """Integer window sums: global (``kernel=None``) or an ``AvgPool2d`` window without padding."""

    src: str
    dst: str
    kernel: tuple[int, int] | None
    stride: tuple[int, int] | None


@dataclass(frozen=True)
class ClampInts:
    """Clamp integers to ``[lo, hi]`` (a ReLU-like module applied to a grid value)."""

    src: str
    dst: str
    lo: int
    hi: int


@dataclass(frozen=True)
class Apply:
    """A value-preserving op on the integers, as plain data (see :func:`apply_op`)."""

    src: str
    dst: str
    op: tuple[
        Any, ...
    ]  # ("identity",) | ("flatten", start, end) | ("method", name, args) | ("maxpool", k, s, p, d, ceil)


@dataclass(frozen=True)
class Output:
    """Logits: integers times their scale, clamped by a pending real clamp, as float32."""

    src: str
    scale: torch.Tensor  # float64 (C,) or (1,)
    lo: float = -math.inf
    hi: float = math.inf


Step = QuantizeInput | Accumulate | Requantize | AddGrids | PoolSum | ClampInts | Apply | Output


@dataclass(frozen=True)
class Program:
    """The lowered model: steps in execution order; ``inexact`` names layers whose float32 sums may round."""

    steps: tuple[Step, ...]
    inexact: tuple[str, ...] = field(default=())

    @property
    def float32_exact(self) -> bool:
        """True when every float32 convolution of :mod:`simulate` is exact (no layer's sums reach 2**24)."""
        return not self.inexact


def channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-channel vector (C,) viewed to broadcast along dim 1 of a ``dim``-d tensor; one value stays (1,)."""
    return t.reshape(1, -1, *([1] * (dim - 2))) if t.numel() > 1 and dim >= 2 else t.reshape(-1)


def apply_op(op: tuple[Any, ...], t: torch.Tensor) -> torch.Tensor:
    """Run an :class:`Apply` op (given as plain data) on ``t``."""
    kind = op[0]
    if kind == "identity":
        return t
    if kind == "flatten":
        return t.flatten(op[1], op[2])
    if kind == "method":
        out: torch.Tensor = getattr(t, op[1])(*op[2])
        return out
    if kind == "maxpool":
        return F.max_pool2d(t, op[1], op[2], op[3], op[4], op[5])
    raise BitsweepError(f"unknown integer op {kind!r}")
