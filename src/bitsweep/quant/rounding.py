"""Rounding policies: how a weight quantizer turns real weights into integers.

A policy is any object called as ``policy(weight, scale, zero_point, spec)``
that returns int32 integers shaped like ``weight`` inside ``spec.qmin..qmax``.
:class:`~bitsweep.quant.modules.WeightQuantizer` asks its policy at
``convert`` instead of hard-wiring round-to-nearest, so a learned rounding
(AdaRound: each integer the floor or the ceiling of ``w / scale``) plugs in as
a policy, or sets the integers it found directly with
``WeightQuantizer.set_integers``; both paths are checked by
:func:`check_integers`.

Policies are looked up by name in ``ROUNDING_POLICIES`` (name -> class; a
policy may carry per-layer state, so each quantizer gets its own instance).

>>> import torch
>>> from bitsweep.quant.spec import QuantSpec
>>> rounding_policy("nearest")(torch.tensor([0.26, -0.74]), torch.tensor(0.5), torch.tensor(0), QuantSpec(4)).tolist()
[1, -1]
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import torch

from bitsweep.quant.primitives import quantize
from bitsweep.quant.registry import lookup
from bitsweep.quant.spec import QuantSpec


class RoundingPolicy(Protocol):
    """What a weight quantizer calls to choose its integers."""

    name: str

    def __call__(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
    ) -> torch.Tensor:
        """Integers (int32, shaped like ``weight``) in ``spec.qmin..spec.qmax``."""
        ...


class NearestRounding:
    """Round to nearest (half to even): the reference formula of :func:`bitsweep.quant.primitives.quantize`."""

    name = "nearest"

    def __call__(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
    ) -> torch.Tensor:
        return quantize(weight, scale, zero_point, spec)

    def __repr__(self) -> str:
        return "NearestRounding()"


# The registry: policy name -> class. Read-only; new policies are added here.
ROUNDING_POLICIES: Mapping[str, type[RoundingPolicy]] = MappingProxyType({"nearest": NearestRounding})


def rounding_policy(name: str) -> RoundingPolicy:
    """A fresh instance of the policy registered as ``name``; ValueError listing the choices otherwise."""
    return lookup(ROUNDING_POLICIES, name, "rounding policy")()


def check_integers(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Validate integers chosen by an algorithm and return them as int32.

    Checks that ``q`` holds whole numbers inside ``spec.qmin..spec.qmax``
    (binary grids: only -1 and +1), that ``q`` has ``shape`` when given, and
    that ``scale`` (positive, finite) and ``zero_point`` (whole numbers in the
    grid) have one entry per channel along ``spec.channel_axis`` (per channel)
    or one entry (per tensor).

    Raises:
        ValueError: saying which of these does not hold.

    >>> check_integers(torch.tensor([1.0, -2.0]), torch.tensor(0.1), torch.tensor(0), QuantSpec(3)).dtype
    torch.int32
    >>> check_integers(torch.tensor([4]), torch.tensor(0.1), torch.tensor(0), QuantSpec(3))
    Traceback (most recent call last):
    ...
    ValueError: integers must lie in -4..3 for a 3-bit grid; got values from 4 to 4
    """
    if shape is not None and tuple(q.shape) != tuple(shape):
        raise ValueError(f"integers have shape {tuple(q.shape)}, but the weight has shape {tuple(shape)}")
    if q.is_floating_point():
        if not bool(torch.isfinite(q).all()) or not torch.equal(q, q.round()):
            raise ValueError("integers must be whole numbers; round them (or pass an integer tensor)")
    elif q.dtype == torch.bool or q.is_complex():
        raise ValueError(f"integers must be an integer or float tensor, got {q.dtype}")
    if q.numel():
        lo, hi = int(q.min()), int(q.max())
        if lo < spec.qmin or hi > spec.qmax:
            raise ValueError(
                f"integers must lie in {spec.qmin}..{spec.qmax} for a {spec.bits}-bit grid; "
                f"got values from {lo} to {hi}"
            )
        if spec.binary and bool((q == 0).any()):
            raise ValueError("binary integers must be -1 or +1 (0 is not a level of the 1-bit grid)")
    channels = q.shape[spec.channel_axis] if spec.per_channel and q.dim() > spec.channel_axis else 1
    for what, t in (("scale", scale), ("zero_point", zero_point)):
        if t.numel() != channels:
            raise ValueError(
                f"{what} has {t.numel()} entries, but a {spec.granularity} quantizer of this weight needs {channels}"
            )
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError("scale must be positive and finite")
    if zero_point.is_floating_point() and not torch.equal(zero_point, zero_point.round()):
        raise ValueError("zero_point must hold whole numbers")
    return q.to(torch.int32)
