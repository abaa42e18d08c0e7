"""A MobileNet-v2 written the common way: functional adds, ``torch.add``, ``F.relu6``, ``x.mean``, ``torch.flatten``.

Used to check that everything ``quantize_`` takes also lowers, packs and exports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU6(nn.Module):
    """Conv -> BatchNorm -> ``F.relu6`` (a function, not a module)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """Expand, depthwise, project; the residual is ``x + self.conv(x)`` or ``torch.add(x, self.conv(x))``."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, torch_add: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(
            ConvBNReLU6(cin, hidden, kernel=1),
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout
        self.torch_add = torch_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.residual:
            return self.conv(x)
        if self.torch_add:
            return torch.add(x, self.conv(x))
        return x + self.conv(x)


class FunctionalMobileNetV2(nn.Module):
    """A tiny MobileNet-v2; ``pool="mean"`` pools with ``x.mean((2, 3))``, ``"adaptive"`` with
    ``torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, pool: str = "mean") -> None:
        super().__init__()
        self.stem = ConvBNReLU6(in_channels, 8)
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 16, 2, 2),
            InvertedResidual(16, 16, 1, 2, torch_add=True),
        )
        self.head = ConvBNReLU6(16, 32, kernel=1)
        self.classifier = nn.Linear(32, num_classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))  # (N, 1, H, W) -> (N, 32, H/2, W/2)
        if self.pool == "mean":
            x = x.mean((2, 3))  # (N, 32)
        else:
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, 32, 1, 1) -> (N, 32)
        return self.classifier(F.dropout(x, 0.2, self.training))


def functional_mobilenet(pool: str = "mean", seed: int = 0) -> FunctionalMobileNetV2:
    """A randomly initialised model in eval mode, with random BN statistics so folding does something."""
    torch.manual_seed(seed)
    model = FunctionalMobileNetV2(pool=pool).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model
