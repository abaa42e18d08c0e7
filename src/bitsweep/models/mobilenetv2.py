"""MobileNet-v2 for small images (CIFAR, Fashion-MNIST, digits).

The layer structure and parameter count are those of the ImageNet network
(Sandler et al., 2018), so published parameter counts apply: 2,236,682 for 10
classes and 2,351,972 for 100 classes at width 1.0. Only two strides differ:
the stem and the first 24-channel stage use stride 1, because a 32x32 input
downsampled 32 times would leave a 1x1 map after the third stage.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsweep.models.common import check_size_options, init_weights

# (expansion t, output channels c, repeats n, first stride s) per stage.
# Strides of the stem and of stage 2 are 1 instead of 2 for 32x32 inputs.
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing over 10 %.

    Hardware kernels run best on channel counts that are multiples of 8; this
    is the rounding used by the reference implementation, kept so that width
    multipliers give the same layer sizes as published models.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNAct(nn.Sequential):
    """Convolution -> BatchNorm -> optional ReLU6, the unit BN folding works on."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            layers.append(nn.ReLU6(inplace=False))
        super().__init__(*layers)


class Add(nn.Module):
    """Residual addition as a module, so quantizers can observe both inputs and the sum."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_channels, hidden, kernel_size=1))
        layers.append(ConvBNAct(hidden, hidden, stride=stride, groups=hidden))
        layers.append(ConvBNAct(hidden, out_channels, kernel_size=1, activation=False))
        self.conv = nn.Sequential(*layers)
        self.add = Add() if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        if self.add is not None:
            out = self.add(x, out)
        return out


class MobileNetV2(nn.Module):
    """MobileNet-v2 with a stride-1 stem for 32x32 (or 28x28, 8x8) images."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_size_options("mobilenetv2", width, dropout)
        stem = make_divisible(32 * width)
        self.last_channels = make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [ConvBNAct(in_channels, stem, stride=1)]
        channels = stem
        for t, c, n, s in _STAGES:
            out = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(ConvBNAct(channels, self.last_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C, H, W) -> (N, 1280, H/8, W/8)
        x = self.pool(x).flatten(1)  # (N, 1280, 1, 1) -> (N, 1280)
        logits: torch.Tensor = self.classifier(x)
        return logits
