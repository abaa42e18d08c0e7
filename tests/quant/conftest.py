"""Tiny models for the quantization tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsweep.models.mobilenetv2 import MobileNetV2


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is actually tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture
def mbv2() -> nn.Module:
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=10, in_channels=1, width=0.25).eval()
    with torch.no_grad():
        model.classifier[1].weight.normal_(0, 0.3)  # logits of a useful size
    return randomize_bn(model)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tensors here are tiny, and on a shared 2-core machine every
    parallel region waits for a descheduled second thread (~20 ms per op under load)."""
    from bitsweep.runtime import torch_threads

    with torch_threads(1):
        yield
