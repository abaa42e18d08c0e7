"""Batched augmentation: shapes, dtypes, and that each op does what its name says."""

from __future__ import annotations

import pytest
import torch

from bitsweep.config import AugmentConfig
from bitsweep.data.augment import augment_batch, cutout, random_crop, random_hflip
from bitsweep.data.autoaugment import OPS, POLICY, apply_op, autoaugment


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 64, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (n, c, size, size), generator=_gen(seed), dtype=torch.uint8)


def test_hflip_is_a_flip() -> None:
    x = _batch()
    y = random_hflip(x, _gen())
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 10 < int(flipped.sum()) < 54  # about half


def test_crop_shifts_content_with_zero_border() -> None:
    pad = 3
    x = _batch(n=32)  # all values >= 1, so zeros can only come from the padding
    y = random_crop(x, pad, _gen())
    assert y.shape == x.shape and y.dtype == torch.uint8
    shifted = 0
    for i in range(x.shape[0]):
        padded = torch.nn.functional.pad(x[i], (pad,) * 4)
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(padded[:, dy : dy + 16, dx : dx + 16], y[i])
        ]
        assert len(matches) == 1
        shifted += matches[0] != (pad, pad)
    assert shifted > 20


def test_cutout_zeroes_one_square() -> None:
    size = 6
    x = torch.full((200, 1, 16, 16), 200, dtype=torch.uint8)
    y = cutout(x, size, _gen())
    full = 0
    for img in y[:, 0]:
        zero = img == 0
        rows, cols = zero.any(1).nonzero().squeeze(1), zero.any(0).nonzero().squeeze(1)
        h, w = len(rows), len(cols)
        assert 0 < h <= size and 0 < w <= size
        assert int(zero.sum()) == h * w  # a solid rectangle ...
        assert int(rows[-1] - rows[0]) == h - 1 and int(cols[-1] - cols[0]) == w - 1
        assert bool((img[~zero] == 200).all())  # ... and nothing else changed
        if h == w == size:
            full += 1
        else:  # only clipped at the border
            assert rows[0] == 0 or rows[-1] == 15 or cols[0] == 0 or cols[-1] == 15
    assert full > 50


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_batch_shapes_and_determinism(channels: int) -> None:
    x = _batch(n=48, c=channels)
    cfg = AugmentConfig(crop_padding=4, hflip=True, autoaugment=True, cutout=8)
    a, b = augment_batch(x, cfg, _gen(7)), augment_batch(x, cfg, _gen(7))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, cfg, _gen(8)))
    off = AugmentConfig(crop_padding=0, hflip=False, autoaugment=False, cutout=0)
    assert torch.equal(augment_batch(x, off, _gen()), x)


def test_policy_is_the_cifar10_policy() -> None:
    assert len(POLICY) == 25 and all(len(sub) == 2 for sub in POLICY)
    assert {op for sub in POLICY for op, _, _ in sub} == set(OPS) - {"ShearX"}  # ShearX is not in this policy
    assert POLICY[0] == (("Invert", 0.1, None), ("Contrast", 0.2, 6))
    assert POLICY[24] == (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None))


def test_autoaugment_changes_most_images_and_keeps_some() -> None:
    x = _batch(n=256, c=3, size=32)
    y = autoaugment(x, _gen(1))
    changed = (y != x).flatten(1).any(1).float().mean()
    assert 0.5 < changed < 0.98  # some sub-policies' coins (and Invert p=0.0) leave images untouched


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("channels", [1, 3])
def test_each_op_keeps_shape_and_dtype(name: str, channels: int) -> None:
    x = _batch(n=5, c=channels, size=12)
    value = {"Posterize": 4.0, "Solarize": 128.0}.get(name, 0.3 if "Shear" in name else 2.0)
    y = apply_op(x, name, value)
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_op_semantics() -> None:
    x = _batch(n=4, c=3, size=12)
    assert torch.equal(apply_op(x, "Invert", 0), 255 - x)
    assert torch.equal(apply_op(x, "Posterize", 3), x & 0b11100000)
    assert torch.equal(apply_op(x, "Solarize", 100), torch.where(x >= 100, 255 - x, x))
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert torch.equal(apply_op(x, name, 1.0), x)  # factor 1 is the identity
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert torch.equal(apply_op(x, name, 0.0), x)
    assert torch.equal(apply_op(x, "Brightness", 0.0), torch.zeros_like(x))
    gray = apply_op(x, "Color", 0.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    t = apply_op(x, "TranslateX", 3.0)  # input = output + 3: content moves 3 pixels left, grey fills in
    assert torch.equal(t[..., :-3], x[..., 3:]) and bool((t[..., -3:] == 128).all())


def test_autocontrast_and_equalize_keep_constant_images() -> None:
    x = (torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8) + 50).repeat(2, 1, 1, 1)
    x[1] = 77
    ac = apply_op(x, "AutoContrast", 0)
    assert int(ac[0].min()) == 0 and int(ac[0].max()) == 255 and torch.equal(ac[1], x[1])
    assert torch.equal(apply_op(x, "Equalize", 0)[1], x[1])


@pytest.mark.parametrize(
    ("name", "value", "tol"),
    [("Equalize", 0, 0), ("AutoContrast", 0, 1), ("Posterize", 5, 0), ("Solarize", 170, 0), ("Invert", 0, 0),
     ("Brightness", 1.6, 1), ("Color", 0.37, 1), ("Contrast", 1.5, 1), ("Sharpness", 1.8, 1)],
)  # fmt: skip
def test_colour_ops_match_pil(name: str, value: float, tol: int) -> None:
    """Pillow (installed with matplotlib) is the reference the AutoAugment paper's code used."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    rng = np.random.default_rng(3)
    # smooth-ish images with a limited range, so AutoContrast and Equalize have work to do
    arr = (rng.integers(40, 180, (2, 24, 24, 3)) // 1).astype(np.uint8)
    arr[1] = np.clip(arr[1].astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    pil = {
        "Equalize": ImageOps.equalize, "AutoContrast": ImageOps.autocontrast, "Invert": ImageOps.invert,
        "Posterize": lambda im: ImageOps.posterize(im, int(value)),
        "Solarize": lambda im: ImageOps.solarize(im, value),
        "Brightness": lambda im: ImageEnhance.Brightness(im).enhance(value),
        "Color": lambda im: ImageEnhance.Color(im).enhance(value),
        "Contrast": lambda im: ImageEnhance.Contrast(im).enhance(value),
        "Sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(value),
    }[name]  # fmt: skip
    expected = np.stack([np.asarray(pil(Image.fromarray(a))) for a in arr])  # (N, H, W, C)
    got = apply_op(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), name, value).permute(0, 2, 3, 1)
    assert int(np.abs(got.numpy().astype(int) - expected.astype(int)).max()) <= tol
