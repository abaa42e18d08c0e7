"""The CIFAR-10 AutoAugment policy (Cubuk et al., 2019), batched on uint8 (B, C, H, W) images.

Each image draws one of the 25 sub-policies; each sub-policy is two
(op, probability, magnitude level 0..9) steps. For each step, the images
whose draw selected a given op (and whose coin came up) are gathered and that
op runs once on the gathered subset, so a batch costs at most one call per op
name per step instead of one per image. Magnitudes follow torchvision's
mapping of the paper's levels, signed ops get a random sign per image, and
geometric ops fill uncovered pixels with grey (128) as the original code did.
Every op also works on 1-channel images (Color is then the identity).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (op, probability, level) pairs; level None for ops without a magnitude.
POLICY: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
FILL = 128.0
_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                     "Sharpness"})  # fmt: skip


def magnitude(name: str, level: torch.Tensor, sign: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Map levels 0..9 (float (n,)) to each op's parameter, as torchvision's AutoAugment does.

    >>> magnitude("Posterize", torch.tensor([7.0]), torch.tensor([1.0]), 32, 32).tolist()
    [5.0]
    """
    t = level / 9.0
    if name in ("ShearX", "ShearY"):
        value = 0.3 * t
    elif name == "TranslateX":
        value = 150.0 / 331.0 * width * t
    elif name == "TranslateY":
        value = 150.0 / 331.0 * height * t
    elif name == "Rotate":
        value = 30.0 * t
    elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 1.0 + 0.9 * t * sign
    elif name == "Posterize":
        return 8.0 - torch.round(level / 2.25)  # bits kept
    elif name == "Solarize":
        return 255.0 * (1.0 - t)  # threshold
    else:
        return torch.zeros_like(level)
    return value * sign if name in _SIGNED else value


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


def _affine(images: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Resample by the pixel-space map input = A @ output + t (about the image centre); nearest, grey fill.

    a: (n, 2, 2) in (x, y) pixel units, t: (n, 2) pixels.
    """
    n, c, h, w = images.shape
    # affine_grid works in [-1, 1] coordinates: x_norm = x_pix * 2/W, y_norm = y_pix * 2/H (from the centre)
    d = torch.tensor([2.0 / w, 2.0 / h], device=images.device)
    lin = d[None, :, None] * a / d[None, None, :]  # D @ A @ D^-1, (n, 2, 2)
    theta = torch.cat([lin, (t * d)[:, :, None]], dim=2)  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    # zero padding of (x - fill) + fill == padding with the fill value
    out = F.grid_sample(images.float() - FILL, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return _to_u8(out + FILL)


def _eye(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, device=m.device).expand(m.shape[0], 2, 2).clone()


def _shear(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        a = _eye(m)
        a[:, axis, 1 - axis] = m
        return _affine(images, a, torch.zeros(m.shape[0], 2, device=m.device))

    return op


def _translate(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(m.shape[0], 2, device=m.device)
        t[:, axis] = m
        return _affine(images, _eye(m), t)

    return op


def _rotate(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    rad = m * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    a = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
    return _affine(images, a, torch.zeros(m.shape[0], 2, device=m.device))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (PIL's "L"), (n, C, H, W) -> (n, 1, H, W); a 1-channel image is its own luma."""
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).floor()
    return x.mean(1, keepdim=True)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate)."""
    return _to_u8(degenerate + factor[:, None, None, None] * (x - degenerate))


def _brightness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = images.float()
    return _blend(x, torch.zeros_like(x), m)


def _color(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = images.float()
    return _blend(x, _gray(x).expand_as(x), m)


def _contrast(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = images.float()
    mean = torch.floor(_gray(x).mean((1, 2, 3), keepdim=True) + 0.5)  # (n, 1, 1, 1)
    return _blend(x, mean.expand_as(x), m)


def _sharpness(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = images.float()
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=c).round()  # (n, C, H-2, W-2); PIL keeps the border pixels
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, m)


def _autocontrast(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    x = images.float()
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi <= lo  # constant channels stay as they are
    scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp(min=1.0))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return _to_u8((x - lo) * scale)


def _equalize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PIL's per-channel histogram equalization, all channels of all images at once."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()  # one row per (image, channel)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    bins = torch.arange(256, device=images.device)
    last = hist.gather(1, ((hist > 0).long() * bins).amax(1, keepdim=True)).squeeze(1)
    step = (hist.sum(1) - last) // 255  # (n*C,)
    lut = (hist.cumsum(1) + (step // 2)[:, None]) // step.clamp(min=1)[:, None]
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    lut = torch.where(step[:, None] == 0, bins.expand_as(lut), lut)  # one grey level: unchanged
    return lut.gather(1, flat).reshape(n, c, h, w).to(torch.uint8)


def _posterize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    shift = (8 - m.long()).clamp(0, 8)
    mask = ((0xFF << shift) & 0xFF).to(torch.uint8)
    return images & mask[:, None, None, None]


def _solarize(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(images.float() >= m[:, None, None, None], 255 - images, images)


def _invert(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return 255 - images


OPS: types.MappingProxyType[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = types.MappingProxyType(
    {
        "ShearX": _shear(0),
        "ShearY": _shear(1),
        "TranslateX": _translate(0),
        "TranslateY": _translate(1),
        "Rotate": _rotate,
        "Brightness": _brightness,
        "Color": _color,
        "Contrast": _contrast,
        "Sharpness": _sharpness,
        "AutoContrast": _autocontrast,
        "Equalize": _equalize,
        "Posterize": _posterize,
        "Solarize": _solarize,
        "Invert": _invert,
    }
)


def apply_op(images: torch.Tensor, name: str, value: float | torch.Tensor) -> torch.Tensor:
    """Apply one op with an explicit parameter (a shear, a pixel shift, a factor, bits, a threshold) to all images.

    >>> apply_op(torch.tensor([[[[0, 200]]]], dtype=torch.uint8), "Invert", 0).tolist()
    [[[[255, 55]]]]
    """
    m = torch.as_tensor(value, dtype=torch.float32, device=images.device).expand(images.shape[0])
    return OPS[name](images, m)


def autoaugment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply the CIFAR-10 AutoAugment policy to a uint8 (B, C, H, W) batch.

    Draws a fixed number of random values per batch from ``generator`` (CPU),
    whatever ops end up applied, so the stream stays aligned across batches.
    """
    b, _, h, w = images.shape
    dev = images.device
    choice = torch.randint(0, len(POLICY), (b,), generator=generator)
    out = images.clone()
    for slot in (0, 1):
        coin = torch.rand(b, generator=generator)
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        names = [sub[slot][0] for sub in POLICY]
        probs = torch.tensor([sub[slot][1] for sub in POLICY])[choice]
        levels = torch.tensor([float(sub[slot][2] or 0) for sub in POLICY])[choice]
        applied = coin < probs
        for name in sorted(set(names)):
            uses = torch.tensor([n == name for n in names])[choice]
            idx = (applied & uses).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            m = magnitude(name, levels[idx], sign[idx], h, w).to(dev)
            idx = idx.to(dev)
            out[idx] = OPS[name](out[idx], m)
    return out
