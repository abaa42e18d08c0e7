"""Tiny converted quantized models shared by the measure tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from bitsweep.measure.packed import Architecture
from bitsweep.models import create_model
from bitsweep.quant import QuantConfig, calibrate, convert, quantize_

ARCH = Architecture("mobilenetv2", 10, 1, (8, 8), (0.5,), (0.25,), {"width": 0.25})


def make_quantized(weight_bits: int, activation_bits: int | None = 8, seed: int = 0) -> tuple[nn.Module, QuantConfig]:
    """A width-0.25 MobileNet-v2 on 1x8x8 inputs, randomly initialised, calibrated on noise, converted."""
    torch.manual_seed(seed)
    model = create_model("mobilenetv2", 10, 1, width=0.25).eval()
    # Random BN statistics so folding produces non-trivial weights and biases.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    config = QuantConfig.from_bits(weight_bits, activation_bits)
    quantize_(model, config)
    g = torch.Generator().manual_seed(seed)
    calibrate(model, [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)], num_batches=2)
    convert(model)
    return model, config


@pytest.fixture(scope="session")
def quantized() -> Callable[..., tuple[nn.Module, QuantConfig]]:
    """Factory fixture ``quantized(weight_bits, activation_bits)``; one model per widths per session (read-only use)."""
    cache: dict[tuple[int, int | None], tuple[nn.Module, QuantConfig]] = {}

    def get(weight_bits: int, activation_bits: int | None = 8) -> tuple[nn.Module, QuantConfig]:
        key = (weight_bits, activation_bits)
        if key not in cache:
            cache[key] = make_quantized(weight_bits, activation_bits)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def arch() -> Architecture:
    """The architecture record of :func:`make_quantized` models."""
    return ARCH
