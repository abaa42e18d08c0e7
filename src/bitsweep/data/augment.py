"""Batched training-time augmentation on uint8 (B, C, H, W) images.

Every op transforms a whole batch with tensor operations on the batch's
device (no per-image Python or PIL loop), and every random draw comes from a
caller-owned CPU ``torch.Generator``. Drawing on the CPU makes the result the
same on every device, and the number of draws per batch is fixed, so a
training run that resumes at epoch ``e`` sees exactly the augmented images an
uninterrupted run would have seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitsweep.config import AugmentConfig
from bitsweep.data.autoaugment import autoaugment


def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels and crop back to the original size at a random offset per image.

    Equivalent to shifting each image by (dy, dx) in [-padding, padding] with
    zeros shifted in.
    """
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    dev = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(dev)  # (2, B): dy, dx
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    rows = offsets[0][:, None] + _arange(h, dev)  # (B, H)
    cols = offsets[1][:, None] + _arange(w, dev)  # (B, W)
    # advanced indexing broadcasts to (B, C, H, W)
    return padded[
        _arange(b, dev)[:, None, None, None],
        _arange(c, dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per image (DeVries & Taylor, 2017).

    The square's centre is uniform over the image, and the square is clipped
    at the border, as in the original Cutout.
    """
    if size <= 0:
        return images
    b, _, h, w = images.shape
    dev = images.device
    cy = torch.randint(0, h, (b,), generator=generator).to(dev)
    cx = torch.randint(0, w, (b,), generator=generator).to(dev)
    y0, x0 = cy - size // 2, cx - size // 2
    ys, xs = _arange(h, dev), _arange(w, dev)
    in_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] < (y0 + size)[:, None])  # (B, H)
    in_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] < (x0 + size)[:, None])  # (B, W)
    hole = in_y[:, :, None] & in_x[:, None, :]  # (B, H, W)
    return images.masked_fill(hole[:, None], 0)


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Apply the configured ops in the usual CIFAR order: crop, flip, AutoAugment, Cutout.

    Args:
        images: uint8 (B, C, H, W) on any device.
        config: Which ops run and their sizes.
        generator: CPU generator that supplies every random draw.

    Returns:
        A new uint8 (B, C, H, W) tensor on the same device.
    """
    out = random_crop(images, config.crop_padding, generator)
    if config.hflip:
        out = random_hflip(out, generator)
    if config.autoaugment:
        out = autoaugment(out, generator)
    return cutout(out, config.cutout, generator)
