"""Weight scales and biases on the float16 grid, so the packed file can store them in half the bytes.

At low bit widths a MobileNet's per-channel scales and folded biases are a large share of
the packed file (9,282 float32 scales and as many biases beside 188 kB of 2-8 bit weights).
Storing them as float16 halves that, and it is *exact* rather than an approximation of the
model: conversion rounds every weight scale and bias to its nearest float16 value (kept in
float32 tensors), picks the weight integers with the rounded scale, and only then is the
model measured, simulated, exported or packed. The file then holds precisely the values
the integer program used, and a float16 -> float32 read gives them back bit for bit.

Scales are clamped into float16's *normal* range first: a scale that rounded to 0 or
infinity would break the grid, and a subnormal one would keep only a few significant bits.
Biases keep float16 subnormals (those are exact too), clamped to the largest finite value.

>>> import torch
>>> round_scale(torch.tensor([0.1, 1e-9, 1e9]), "float16").tolist()
[0.0999755859375, 6.103515625e-05, 65504.0]
>>> round_scale(torch.tensor([0.1]), "float32").tolist() == torch.tensor([0.1]).tolist()
True
"""

from __future__ import annotations

import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.inspect import weight_layers

SCALE_DTYPES = ("float32", "float16")
_TORCH = {"float32": torch.float32, "float16": torch.float16}
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FLOAT16_TINY = float(torch.finfo(torch.float16).tiny)  # 2**-14, the smallest normal float16


def check_scale_dtype(name: object) -> str:
    """Return ``name`` if it is a storage dtype for weight scales and biases, else a BitsweepError listing them."""
    if not isinstance(name, str) or name not in SCALE_DTYPES:
        raise BitsweepError(
            f"scale_dtype must be one of {', '.join(SCALE_DTYPES)} (how weight scales and biases are stored), "
            f"got {name!r}"
        )
    return name


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype weight scales and biases are written with in the packed file."""
    return _TORCH[check_scale_dtype(name)]


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``scale`` (float32) moved to the nearest value ``scale_dtype`` holds, within its normal range."""
    s = scale.detach().float()
    if check_scale_dtype(scale_dtype) == "float32":
        return s
    return s.clamp(FLOAT16_TINY, FLOAT16_MAX).to(torch.float16).float()


def round_bias(bias: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``bias`` (float32) moved to the nearest value ``scale_dtype`` holds, clamped to its finite range."""
    b = bias.detach().float()
    if check_scale_dtype(scale_dtype) == "float32":
        return b
    return b.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).float()


@torch.no_grad()
def apply_scale_dtype(model: nn.Module, scale_dtype: str) -> nn.Module:
    """Put every converted weight layer's scales and bias on the ``scale_dtype`` grid; returns ``model``.

    Integers that the layer's rounding policy chose (round-to-nearest) are chosen again with the
    rounded scale, so they stay the nearest levels; integers an algorithm picked some other way
    (learned rounding, reconstruction) are kept: they remain valid levels and the change of scale
    is below float16's relative precision (2**-11). Either way the model, its integer program and
    its packed file hold the same numbers. A no-op for ``float32``.
    """
    if check_scale_dtype(scale_dtype) == "float32":
        return model
    for _, m in weight_layers(model):
        wq = m.weight_quantizer
        if wq.q.numel() == 0 or m.weight_mode != "quantize":  # not converted: nothing is fixed yet
            continue
        old = wq.scale.detach()
        new = round_scale(old, scale_dtype).to(old.device)
        if not torch.equal(new, old.float()):
            q = wq.q
            if torch.equal(q, wq.rounding(m.weight, old, wq.zero_point, wq.spec).to(q.device)):
                q = wq.rounding(m.weight, new, wq.zero_point, wq.spec).to(q.device)
            if isinstance(wq.scale, nn.Parameter):
                wq.scale.data = new
            else:
                wq.scale = new
            wq.q = q
            m.refresh()
        if m.bias is not None:  # a new Parameter: a float model sharing the old one keeps its bias
            m.bias = nn.Parameter(round_bias(m.bias, scale_dtype).to(m.bias.dtype), m.bias.requires_grad)
    return model
