"""Activation memory: totals and peaks checked against hand-counted small graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.measure.activations import activation_memory
from bitsweep.models import create_model


def _chain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def test_chain_total_and_peak_by_hand() -> None:
    r = activation_memory(_chain(), (1, 4, 4), bits=8)
    # Tensors: input 16, conv0 64 (ReLU folded in place), conv2 32 elements.
    assert [t.elements for t in r.tensors] == [16, 64, 32]
    assert r.total_fp32_bytes == 4 * (16 + 64 + 32)
    assert r.total_quant_bytes == 16 + 64 + 32
    # Peak while running the last conv: its input (64) and output (32) are alive.
    assert r.peak_fp32_bytes == 4 * 96 and r.peak_quant_bytes == 96
    assert r.total_ratio == pytest.approx(4.0) and r.peak_ratio == pytest.approx(4.0)


def test_sub_byte_bits_round_up_per_tensor() -> None:
    r = activation_memory(_chain(), (1, 4, 4), bits=3)
    assert [t.quant_bytes for t in r.tensors] == [6, 24, 12]  # ceil(16*3/8), ceil(64*3/8), ceil(32*3/8)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


def test_residual_input_stays_alive() -> None:
    r = activation_memory(_Residual().eval(), (2, 3, 3), bits=None)
    # x, a (relu folded), b, add: 18 elements each at 32 bits (no quantizers).
    assert [t.bits for t in r.tensors] == [32, 32, 32, 32]
    assert r.total_fp32_bytes == 4 * 18 * 4
    # During b: x (needed by add), a's output and b's output are alive: 3 tensors.
    assert r.peak_fp32_bytes == 4 * 18 * 3


def test_mobilenet_ratio_and_peak_below_total() -> None:
    model = create_model("mobilenetv2", 10, 1, width=0.25).eval()
    r = activation_memory(model, (1, 28, 28), bits=4)
    assert r.total_ratio == pytest.approx(8.0, rel=1e-3)
    assert 0 < r.peak_fp32_bytes < r.total_fp32_bytes
    assert r.to_dict()["tensors"][0]["shape"] == [1, 1, 28, 28]


def test_bad_bits() -> None:
    with pytest.raises(BitsweepError, match="1 to 32"):
        activation_memory(_chain(), (1, 4, 4), bits=0)
